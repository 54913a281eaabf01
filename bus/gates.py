"""Gatekeeper processes: ``collabbus up`` judges NATS offers in processes of its own.

Judging an offer (parsing, validating envelope and data, publishing to the log and waiting for its
acknowledgement) is CPU work that keeps nothing between offers, while applying the log to the read
models is one ordered stream of work. In one Python process they take turns on one core; in
separate processes they run side by side. The gatekeepers join the ingress's queue group
``collabbus-gate`` like any other bus process would, so NATS spreads offers over them.

The main process keeps its own gate for what it publishes itself (workflow events, the HTTP
gateway's offers) and opens its NATS ingress whenever no gatekeeper process is ready, so offers
are answered while one starts or restarts. A gatekeeper that exits unexpectedly is started again,
after a pause that grows while it keeps failing.

Counters of the gatekeepers (offers judged, by outcome) are kept in files under
``<data dir>/gate-metrics`` (prometheus-client's multiprocess mode) and served with the main
process's own at ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bus.server import stop_with_parent
from ops.settings import Settings

log = logging.getLogger("collabbus.gates")

READY_LINE = b"gatekeeper ready"
"""What a gatekeeper process prints on stdout once its ingress subscription is open."""

METRICS_DIRECTORY = "gate-metrics"
RESTART_PAUSE = (1.0, 30.0)
"""Seconds before a failed gatekeeper is started again: the first pause, and the longest."""
STEADY_SECONDS = 60.0
"""A gatekeeper that ran this long before it exited is restarted after the first pause again."""


def usable_cores() -> int:
    """The cores this process may run on: the machine's, less those a CPU set (a container's,
    ``taskset``'s) keeps it off. A CPU quota is not seen."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def default_count() -> int:
    """One gatekeeper process when there is a second core for it, else none."""
    return 1 if usable_cores() >= 2 else 0


class GateProcess:
    """One gatekeeper process, kept running until :meth:`stop`."""

    def __init__(self, index: int, command: list[str], env: dict[str, str], on_change: Callable[[], Awaitable[None]]) -> None:
        self.index = index
        self.command = command
        self.env = env
        self.on_change = on_change
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.restarts = 0
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._first_ready = asyncio.Event()
        self._first_exit: int | None = None

    async def start(self, timeout: float) -> None:
        """Start it and wait until it is ready; raise if it exits or takes longer than ``timeout``."""
        self._runner = asyncio.create_task(self._run(), name=f"gatekeeper-{self.index}")
        waiter = asyncio.create_task(self._first_ready.wait())
        await asyncio.wait({waiter, self._runner}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not self._first_ready.is_set():
            reason = f"exited with code {self._first_exit}" if self._first_exit is not None else f"was not ready within {timeout:g} s"
            raise RuntimeError(f"gatekeeper process {self.index} {reason} (its log is above)")

    async def _run(self) -> None:
        pause = RESTART_PAUSE[0]
        while not self._stopping:
            started = time.monotonic()
            self.process = await asyncio.create_subprocess_exec(
                *self.command, env=self.env, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the bus, which stops its gatekeepers in turn
                preexec_fn=stop_with_parent,
            )
            assert self.process.stdout is not None
            async for line in self.process.stdout:
                if line.strip() == READY_LINE and not self.ready:
                    self.ready = True
                    self._first_ready.set()
                    await self.on_change()
            code = await self.process.wait()
            was_ready, self.ready = self.ready, False
            if was_ready:
                await self.on_change()
            if self._stopping:
                return
            if not self._first_ready.is_set():  # it never came up: start-up reports it
                self._first_exit = code
                return
            if time.monotonic() - started >= STEADY_SECONDS:
                pause = RESTART_PAUSE[0]
            log.warning("gatekeeper process %d (pid %d) exited with code %s; starting it again in %g s",
                        self.index, self.process.pid, code, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, RESTART_PAUSE[1])
            self.restarts += 1

    async def stop(self, grace: float) -> None:
        """SIGTERM (it answers the offers in hand, then exits), SIGKILL after ``grace`` s."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)


class GateProcesses:
    """``count`` gatekeeper processes beside the main one (see module).

    ``on_change(ready)`` is awaited whenever the number of ready gatekeepers changes; the main
    process opens or closes its own ingress with it.
    """

    def __init__(self, settings: Settings, count: int, on_change: Callable[[int], Awaitable[None]]) -> None:
        self.settings = settings
        self.count = count
        self.on_change = on_change
        self.metrics_dir = settings.data_dir.resolve() / METRICS_DIRECTORY
        self.processes: list[GateProcess] = []
        self._last_ready = -1
        self._changing = asyncio.Lock()
        self._stopping = False
        self.started = False
        """Whether every gatekeeper was ready once (:meth:`start` returned): until then the bus is
        starting, not ready, whoever judges offers meanwhile."""

    @property
    def ready(self) -> int:
        return sum(process.ready for process in self.processes)

    @property
    def restarts(self) -> int:
        return sum(process.restarts for process in self.processes)

    def environment(self, nats_creds: Path | None) -> dict[str, str]:
        """A gatekeeper's environment: this one's, pointed at the bus's NATS and data dir."""
        settings = self.settings
        env = {key: value for key, value in os.environ.items() if key not in ("COLLABBUS_NATS_CREDS", "PROMETHEUS_MULTIPROC_DIR")}
        env.update(
            COLLABBUS_DATA_DIR=str(settings.data_dir.resolve()),
            COLLABBUS_NATS_URL=",".join(settings.nats_servers),
            COLLABBUS_MAX_EVENT_BYTES=str(settings.max_event_bytes),
            COLLABBUS_LOG_FORMAT=settings.log_format,
            COLLABBUS_LOG_LEVEL=settings.log_level,
            PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir),
        )
        if nats_creds is not None:
            env["COLLABBUS_NATS_CREDS"] = str(nats_creds.resolve())
        return env

    async def start(self, nats_creds: Path | None, timeout: float = 60.0) -> None:
        """Start every gatekeeper and wait until all are ready (raises if one is not)."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)  # counters of earlier runs' processes
        self.metrics_dir.mkdir(parents=True)
        env = self.environment(nats_creds)
        # The data dir on the command line too: `ps` tells whose gatekeepers these are.
        command = [sys.executable, "-m", "ops", "gate", "--data-dir", str(self.metrics_dir.parent)]
        self.processes = [GateProcess(index, command, env, self._changed) for index in range(1, self.count + 1)]
        try:
            await asyncio.gather(*(process.start(timeout) for process in self.processes))
        except BaseException:
            await self.stop()
            raise
        self.started = True

    async def _changed(self) -> None:
        async with self._changing:
            if self._stopping:
                return
            ready = self.ready
            if ready != self._last_ready:
                self._last_ready = ready
                await self.on_change(ready)

    async def stop(self, grace: float = 10.0) -> None:
        self._stopping = True
        await asyncio.gather(*(process.stop(grace) for process in self.processes), return_exceptions=True)

    def check(self, *, judging_here: bool = False) -> str:
        """``ok`` when every gatekeeper is ready; else how many are, and who judges offers
        meanwhile (``judging_here``: the bus's own process), for ``/readyz``."""
        ready = self.ready
        if ready == self.count:
            return "ok"
        if not self.started:
            return f"{ready} of {self.count} gatekeeper processes ready (starting)"
        meanwhile = "; the bus's own process judges NATS offers meanwhile" if judging_here else ""
        return f"{ready} of {self.count} gatekeeper processes ready (the others are restarting){meanwhile}"

