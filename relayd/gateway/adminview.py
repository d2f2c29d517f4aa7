"""The running relay as the admin routes see it (relayd.control.admin's
``RelayView``, live): who is connected and what they offer, open streams,
the endpoints with the agents serving them and their traffic counters, the
hybrid connections of the config and the data directory with their
listeners.

The routes run in worker threads (relayd.control.api); the registry and
the hybrid gateway belong to the event loop, so what they hold is copied
there (``_on_loop``), in one short call. Traffic comes from the relay's own
Prometheus counters (labels are endpoint, agent and hybrid connection
names: bounded), so the API and the dashboard cannot disagree; they count
since the relay started.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

from relayd import metrics
from relayd.control.admin import RelayView
from relayd.control.api import ApiError
from relayd.control.hybrid import Catalog

#: How long a route waits for the event loop to copy its live state.
LOOP_WAIT = 5.0


def sums(metric, label: str, **match: str) -> dict[str, int]:
    """A metric's samples added up by one label (those whose other labels
    are ``match``); a counter's ``_created`` samples left out."""
    out: dict[str, int] = {}
    for family in metric.collect():
        for s in family.samples:
            if s.name.endswith("_created") or any(s.labels.get(k) != v for k, v in match.items()):
                continue
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0) + int(s.value)
    return out


class NodeView(RelayView):
    live = True

    def __init__(self, node) -> None:
        super().__init__(node.data, node.store)
        self.node = node
        self.loop = asyncio.get_running_loop()

    def _on_loop(self, fn):
        try:
            if asyncio.get_running_loop() is self.loop:
                return fn()
        except RuntimeError:
            pass  # a worker thread: the usual case
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                fut.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
            return fut.result(LOOP_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            raise ApiError(503, "unavailable", "the relay is stopping or too busy to answer; try again") from None

    def info(self) -> dict:
        return self._on_loop(self.node.relay_info)

    def sessions(self) -> dict[str, dict]:
        def copy() -> dict:
            return {s.agent_id: {"offered": list(s.offered), "serving": list(s.endpoints), "address": s.address,
                                 "connected_since": s.connected_since, "streams": s.conn.stream_count(),
                                 "bytes_in": s.conn.bytes_in, "bytes_out": s.conn.bytes_out}
                    for s in self.node.sessions.values()}

        return self._on_loop(copy)

    def endpoints(self) -> list[dict]:
        def copy() -> tuple[list, dict, dict]:
            node = self.node
            return (node.relay_info().get("endpoints", []),
                    {name: [s.agent_id for s in ss] for name, ss in node.registry.by_endpoint.items()},
                    {name: node.seam.held(name) for name in node.cfg.endpoints})

        listed, serving, held = self._on_loop(copy)
        conns = sums(metrics.ACTIVE_CONNECTIONS, "endpoint")
        active = sums(metrics.STREAMS_ACTIVE, "endpoint")
        opened = sums(metrics.STREAMS_OPENED, "endpoint")
        failed = sums(metrics.STREAMS_FAILED, "endpoint")
        sent = sums(metrics.BYTES, "endpoint", direction="in")
        received = sums(metrics.BYTES, "endpoint", direction="out")
        out = []
        for e in listed:
            name = e["name"]
            out.append({"name": name, "kind": e["kind"], "listen": e.get("listen"), "route": e.get("route"),
                        "agents": serving.get(name, []),
                        "connections": conns.get(name, 0) if e["kind"] == "tcp" else None,
                        "held": held.get(name, 0), "streams_active": active.get(name, 0),
                        "streams_opened": opened.get(name, 0), "streams_failed": failed.get(name, 0),
                        "bytes_in": sent.get(name, 0), "bytes_out": received.get(name, 0)})
        return out

    def hybrid(self) -> tuple[Catalog, Catalog]:
        config = self.node.cfg.hybrid
        return Catalog.merged(config, self.store.hc_catalog()), config

    def listeners(self) -> dict[str, list[dict]]:
        return self._on_loop(lambda: self.node.hybrid.listener_table() if self.node.hybrid is not None else {})

    def hybrid_traffic(self) -> dict[str, dict]:
        active = sums(metrics.HC_ACTIVE_CONNECTIONS, "entity")
        to_listener = sums(metrics.HC_BYTES, "entity", direction="to_listener")
        to_sender = sums(metrics.HC_BYTES, "entity", direction="to_sender")
        return {p: {"active_connections": active.get(p, 0), "bytes_to_listener": to_listener.get(p, 0),
                    "bytes_to_sender": to_sender.get(p, 0)} for p in set(active) | set(to_listener) | set(to_sender)}

    def agent_revoked(self, agent_id: str) -> None:
        def cut() -> None:
            sess = self.node.sessions.get(agent_id)
            if sess is not None:
                sess.conn.abort()  # its link's end unregisters it, as any link's

        self._on_loop(cut)

    def hybrid_changed(self) -> None:
        try:
            if asyncio.get_running_loop() is self.loop:
                self.loop.create_task(self.node.hybrid_catalog_changed())
                return
        except RuntimeError:
            pass  # a worker thread: wait until the relay serves the change
        try:
            asyncio.run_coroutine_threadsafe(self.node.hybrid_catalog_changed(), self.loop).result(LOOP_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):
            pass  # stopping, or busy: the revision poll applies it within a second
