"""A three-node nats-server cluster with JetStream on 127.0.0.1, for the tests of a bus on a
replicated log (``COLLABBUS_STREAM_REPLICAS=3``): each node a child process of the test, open (no
authentication: the cluster is what is tested, not the credentials)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors

from bus.server import find_binary, free_port, stop_with_parent


@dataclass
class Node:
    name: str
    store: Path
    port: int
    route_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.store / "nats-server.log"


@dataclass
class NatsCluster:
    root: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)
    trust: list[str] = field(default_factory=list)
    """Configuration lines every node carries besides its own: an operator's trust chain
    (``bus.credentials.Authority.server_config``); none, an open cluster."""
    connect: dict[str, object] = field(default_factory=dict)
    """How the cluster's own check of JetStream connects (credentials, for a cluster with trust)."""

    def __post_init__(self) -> None:
        self.nodes = [Node(f"n{i + 1}", self.root / f"n{i + 1}", free_port(), free_port()) for i in range(self.size)]

    @property
    def urls(self) -> str:
        """The nodes' client URLs, comma-separated (``COLLABBUS_NATS_URL``)."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def start_node(self, node: Node) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{other.route_port}" for other in self.nodes if other is not node)
        config = node.store / "nats-server.conf"
        config.write_text("\n".join([
            f"server_name: {node.name}",
            f'listen: "127.0.0.1:{node.port}"',
            f'jetstream {{ store_dir: "{(node.store / "jetstream").resolve()}" }}',
            f'cluster {{ name: collabtest, listen: "127.0.0.1:{node.route_port}", routes: [{routes}] }}',
            *self.trust,
        ]) + "\n")
        log = open(node.log, "ab")
        node.process = subprocess.Popen([str(find_binary()), "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=stop_with_parent)  # (no orphan if the test dies)
        log.close()

    async def serving(self, node: Node, timeout: float = 30.0) -> None:
        """Until ``node`` accepts clients (JetStream may still have no leader)."""
        deadline = time.monotonic() + timeout
        while "Server is ready" not in node.log.read_text(errors="replace"):
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"nats-server {node.name} exited: {node.log.read_text(errors='replace')[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {node.name} did not start")
            await asyncio.sleep(0.05)

    def kill(self, node: Node) -> None:
        """End a node abruptly (SIGKILL): what a crashed machine does to the cluster."""
        if node.process is not None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
            node.process = None

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
                node.process = None

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until JetStream answers (the cluster elected its meta leader)."""
        for node in self.nodes:
            self.start_node(node)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            await self.serving(node, deadline - time.monotonic())
        nc = await nats.connect([node.url for node in self.nodes], **self.connect)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    await nc.jetstream(timeout=1).account_info()
                    return
                except Exception:  # no meta leader yet: JetStream answers 503 or not at all
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
