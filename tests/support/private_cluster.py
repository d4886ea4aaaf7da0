"""A private 3-node RabbitMQ cluster for one test module.

Three `PrivateBroker` nodes on 127.0.0.1 (their own node names, AMQP and
distribution ports, data directories, and a copy of the one Erlang cookie),
joined with ``rabbitmqctl join_cluster``, always stopped afterwards. The
machine's default node is never touched: it is not a member, and no command
here names it.

    with PrivateCluster(tmp_path) as cluster:
        cluster.urls          # one AMQP URL per node
        cluster.broker_url    # all of them, comma-separated (clients fail over)
        cluster.nodes[1].kill(); cluster.nodes[1].start()
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tests.support.private_broker import PrivateBroker, PrivateBrokerError


class PrivateCluster:
    """`size` private nodes joined into one cluster (bounded start and stop)."""

    def __init__(self, root: Path, *, size: int = 3, config: tuple[str, ...] = ()) -> None:
        self.nodes = [PrivateBroker(Path(root) / f"node{i}", config=config) for i in range(size)]

    def __enter__(self) -> PrivateCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def broker_url(self) -> str:
        """Every node's URL, comma-separated: what clients take to fail over."""
        return ",".join(self.urls)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("reset")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
            node.ctl("await_startup")
        self.await_members(len(self.nodes))

    def await_members(self, count: int, timeout: float = 60.0) -> None:
        """Wait until `count` nodes run in the cluster, as the first live
        node sees it."""
        deadline = time.monotonic() + timeout
        while True:
            running = self.running_nodes()
            if len(running) >= count:
                return
            if time.monotonic() > deadline:
                raise PrivateBrokerError(
                    f"cluster has {len(running)} running node(s) of {count} after {timeout:.0f} s"
                )
            time.sleep(0.5)

    def running_nodes(self) -> list[str]:
        for node in self.nodes:
            if node.process is None:
                continue
            done = node.ctl_run("eval", "rabbit_nodes:all_running().", timeout=20)
            if done.returncode == 0:
                return [n for n in self._node_names() if n in done.stdout]
        return []

    def leaders(self, prefix: str) -> dict[str, int]:
        """How many quorum queues named `prefix`... each node leads (by node
        name), as a live node reports them."""
        for node in self.nodes:
            if node.process is None:
                continue
            done = node.ctl_run("list_queues", "-q", "--no-table-headers", "name", "leader")
            if done.returncode != 0:
                continue
            counts = dict.fromkeys(self._node_names(), 0)
            for line in done.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0].startswith(prefix) and parts[1] in counts:
                    counts[parts[1]] += 1
            return counts
        return {}

    def node_named(self, name: str) -> PrivateBroker:
        return next(node for node in self.nodes if node.node == name)

    def _node_names(self) -> list[str]:
        return [node.node for node in self.nodes]

    def stop(self) -> None:
        # Members first, then the first node: each stops on its own, bounded.
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.stop()
