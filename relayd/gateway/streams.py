"""The one place a stream to an agent is opened.

Every way in (public TCP endpoints, HTTP endpoints, the hybrid
connections, the zero-trust gateway and the device proxy) asks here, and
nothing else opens a stream toward an agent. The seam:

* picks the agent serving the endpoint (the one with the fewest streams);
* when none does, holds the request for the grace period and serves it as
  soon as an agent arrives;
* asks the policy hook whether this caller may open this stream;
* makes the trace id and writes the stream-open header;
* counts, the same for every way in: sender connections by result, streams
  opened, failed (by reason) and active, the open latency (request to the
  agent's ACK), and the bytes as they flow (a meter on the stream).

``open(endpoint, client, ready)`` answers through ``ready(stream, None)`` or
``ready(None, reason)``, at once when it can (before ``open`` returns), or
later; a later answer comes with an ``Opening`` the caller cancels if it goes
away first.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Callable

from relayd import metrics
from relayd.core.wire import KIND_CONTROL, KIND_TCP, StreamHeader
from relayd.errors import RelaydError
from relayd.gateway.registry import AgentSession, Registry
from relayd.log import RateLimitedLog

log = logging.getLogger("relayd.gateway")
_REFUSALS = RateLimitedLog(log)

Ready = Callable[..., None]  # ready(stream, reason)


class Opening:
    """A request held for an agent during the grace period."""

    __slots__ = ("seam", "endpoint", "client", "ready", "kind", "identity", "dest", "timer")

    def __init__(self, seam: "StreamSeam", endpoint: str, client: str, ready: Ready, kind: str,
                 identity: str, dest: str = "") -> None:
        self.seam = seam
        self.endpoint = endpoint
        self.client = client
        self.ready = ready
        self.kind = kind
        self.identity = identity
        self.dest = dest
        self.timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        """The caller went away: forget the request."""
        self.seam._forget(self)


class _Meter:
    """One stream's bytes and end, into its endpoint's metrics."""

    __slots__ = ("_in", "_out", "_active")

    def __init__(self, children: tuple) -> None:
        self._in, self._out, _, self._active, _ = children

    def sent(self, n: int) -> None:  # toward the agent
        self._in.inc(n)

    def received(self, n: int) -> None:  # from the agent
        self._out.inc(n)

    def ended(self) -> None:
        self._active.dec()


class StreamSeam:
    def __init__(self, registry: Registry, grace: float = 0.0,
                 allow: Callable[[str, str], bool] | None = None) -> None:
        self.registry = registry
        self.grace = grace
        #: The policy hook: may ``client`` open a stream to ``endpoint``?
        self.allow = allow
        self._waiting: dict[str, list[Opening]] = {}
        self._children: dict[str, tuple] = {}
        self._trace_prefix = secrets.token_hex(4) + "-"
        self._trace_seq = 0
        registry.on_added.append(self._agent_added)

    def open(self, endpoint: str, client: str, ready: Ready, kind: str = KIND_TCP,
             identity: str = "", dest: str = "", agent: str = "") -> Opening | None:
        """Open a stream of ``kind`` to an agent serving ``endpoint`` for
        ``client`` (who is ``identity``, if known; ``dest``: where a dial
        stream goes). ``agent``: that agent's own ``endpoint`` (one it
        offered; the device proxy), now or never: no grace period."""
        if self.allow is not None and not self.allow(endpoint, client):
            self._refuse(endpoint, client, "denied", ready)
            return None
        if agent:
            sess = self.registry.get(agent)
            if sess is None or not sess.conn.accepting_streams or endpoint not in sess.offered:
                self._refuse(endpoint, client, "no_agent", ready)
            else:
                self._open_on(sess, endpoint, client, ready, kind, identity, dest)
            return None
        sess = self.registry.pick(endpoint)
        if sess is not None:
            self._open_on(sess, endpoint, client, ready, kind, identity, dest)
            return None
        if self.grace <= 0:
            self._refuse(endpoint, client, "no_agent", ready)
            return None
        op = Opening(self, endpoint, client, ready, kind, identity, dest)
        op.timer = asyncio.get_running_loop().call_later(self.grace, self._give_up, op)
        self._waiting.setdefault(endpoint, []).append(op)
        return op

    def held(self, endpoint: str) -> int:
        """How many openings wait for an agent of ``endpoint`` (grace)."""
        return len(self._waiting.get(endpoint, ()))

    def close(self) -> None:
        """Node stopping: every held request is refused."""
        waiting, self._waiting = self._waiting, {}
        for ops in waiting.values():
            for op in ops:
                op.timer.cancel()
                op.ready(None, "stopping")

    # -- internals ------------------------------------------------------------------

    def open_control(self, sess: AgentSession):
        """A control stream to one agent (the relay's pushes), or None if its
        link cannot take a stream now."""
        try:
            st = sess.conn.open_stream_nowait()
        except RelaydError:
            return None
        st.send_nowait(StreamHeader(KIND_CONTROL, "", self._trace()).encode())
        return st

    def _trace(self) -> str:
        self._trace_seq += 1
        return f"{self._trace_prefix}{self._trace_seq:x}"

    def _open_on(self, sess: AgentSession, endpoint: str, client: str, ready: Ready, kind: str,
                 identity: str, dest: str = "") -> None:
        try:
            st = sess.conn.open_stream_nowait()
        except RelaydError as exc:
            log.warning("cannot open a stream: %s", exc, extra={"endpoint": endpoint, "agent": sess.agent_id})
            self._refuse(endpoint, client, "agent_busy", ready)
            return
        trace = self._trace()
        st.send_nowait(StreamHeader(kind, endpoint, trace, client, identity, dest).encode())
        agent = sess.agent_id
        children = self._children.get(endpoint)
        if children is None:
            # labels() is a locked dict lookup: resolve once per endpoint.
            # Never per agent: one series per device is 10,000 series.
            children = self._children[endpoint] = (
                metrics.BYTES.labels(endpoint, "in"), metrics.BYTES.labels(endpoint, "out"),
                metrics.STREAMS_OPENED.labels(endpoint), metrics.STREAMS_ACTIVE.labels(endpoint),
                metrics.SENDER_CONNECTIONS.labels(endpoint, "success"))
        children[4].inc()
        children[2].inc()
        children[3].inc()
        st.meter = _Meter(children)
        t0 = st.opened_at

        def accepted(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                metrics.STREAM_OPEN_SECONDS.observe(time.monotonic() - t0)
            else:
                metrics.STREAMS_FAILED.labels(endpoint, "agent_refused").inc()

        st._accepted.add_done_callback(accepted)
        log.debug("stream opened", extra={"endpoint": endpoint, "agent": agent, "trace": trace,
                                          "stream": st.stream_id, "client": client})
        ready(st, None)

    def _refuse(self, endpoint: str, client: str, reason: str, ready: Ready) -> None:
        metrics.SENDER_CONNECTIONS.labels(endpoint, reason).inc()
        metrics.STREAMS_FAILED.labels(endpoint, reason).inc()
        _REFUSALS.info("stream refused", extra={"endpoint": endpoint, "reason": reason, "client": client})
        ready(None, reason)

    def _agent_added(self, sess: AgentSession) -> None:
        # Later in this turn of the loop: the link's protocol is installed
        # after the registry hears of it, and frames queued before would be lost.
        asyncio.get_running_loop().call_soon(self._serve_waiting, sess)

    def _serve_waiting(self, sess: AgentSession) -> None:
        for endpoint in sess.endpoints:
            waiting = self._waiting.pop(endpoint, None)
            for op in waiting or ():
                op.timer.cancel()
                target = self.registry.pick(endpoint)
                if target is None:
                    self._refuse(endpoint, op.client, "no_agent", op.ready)
                else:
                    self._open_on(target, endpoint, op.client, op.ready, op.kind, op.identity, op.dest)

    def _give_up(self, op: Opening) -> None:
        if self._forget(op):
            self._refuse(op.endpoint, op.client, "no_agent", op.ready)

    def _forget(self, op: Opening) -> bool:
        ops = self._waiting.get(op.endpoint)
        if not ops or op not in ops:
            return False
        ops.remove(op)
        if not ops:
            del self._waiting[op.endpoint]
        op.timer.cancel()
        return True
