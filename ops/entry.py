"""The ``collabbus`` command's entry: Ctrl-C while it is still loading (before a command handles
it itself) ends it quietly, with the shell's usual status, instead of an import's traceback.

The signal is held back while the command's modules load and delivered as soon as they have: an
interrupt inside a compiled module's initialisation is not always survivable (orjson 3.13 crashes
with a segmentation fault when one arrives while it initialises)."""

from __future__ import annotations

import signal


def main() -> None:
    try:
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            from ops.cli import app
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        app(prog_name="collabbus")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
