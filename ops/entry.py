"""The ``collabbus`` command's entry: Ctrl-C while it is still loading (before a command handles
it itself) ends it quietly, with the shell's usual status, instead of an import's traceback."""

from __future__ import annotations


def main() -> None:
    try:
        from ops.cli import app

        app(prog_name="collabbus")
    except KeyboardInterrupt:
        raise SystemExit(130) from None
