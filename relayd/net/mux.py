"""yamux over a real transport: the asyncio/uvloop glue around the core.

``MuxConnection`` is an ``asyncio.Protocol``: every chunk the transport
delivers goes straight into the sans-I/O ``Session``; the events that come
out are dispatched to ``MuxStream`` objects; whatever the session queued is
written back at once. There is no reader task and no asyncio streams in the
way (see DESIGN.md: Protocol-based I/O is 2-3x cheaper per byte).

Back-pressure, end to end:

* inbound: a stream's received bytes count as unconsumed until the
  application reads them (``MuxStream.read``), so a slow reader stops its
  sender after one window. A stream buffers at most its receive window.
* outbound: ``MuxStream.write`` waits for the peer's window and, when the
  transport's write buffer is above its high-water mark, for it to drain.

Keepalive: a ping every ``ping_interval``; a ping unanswered after
``ping_timeout`` means the link is dead and the transport is aborted, so both
ends notice a silent peer. Pong times feed the session's RTT estimate, which
drives receive-window growth.

Memory: window growth is paid from the session's receive budget
(``MuxConfig.recv_budget``) and from one ``WindowBudget`` shared by every
session of the process (``MuxConfig.node_recv_budget``, see
``node_budget``), so the bytes in flight toward this node, and what the peer
buffers to send them, are bounded per link and in total. A session gives its
share back when its transport is gone. Once a connection has moved
``TRIM_AFTER_BYTES``, the end of one of its streams asks the allocator to
return freed heap pages (at most every ``TRIM_INTERVAL`` seconds): the
buffers of a burst are freed, but glibc keeps the pages otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Awaitable, Callable

from relayd import metrics
from relayd.core import framing, yamux
from relayd.core.config import MuxConfig
from relayd.log import RateLimitedLog, caught
from relayd.errors import ProtocolError, SessionClosedError, StreamError, StreamResetError
from relayd.net.admission import trim_heap

log = logging.getLogger("relayd.mux")
_PROTOCOL_LOG = RateLimitedLog(log)

#: Bytes a connection moves (both ways) between two requests for a heap trim.
TRIM_AFTER_BYTES = 64 * 1024 * 1024
#: Seconds from a stream's end to the trim (the streams of a burst end together).
TRIM_DELAY = 0.5
#: Seconds between two trims at least.
TRIM_INTERVAL = 5.0

_node_budget = None


def node_budget(config: MuxConfig) -> "yamux.WindowBudget":
    """The receive budget of the whole node: one counter shared by every
    session of this process, its limit ``config.node_recv_budget`` (the
    latest config wins, so a reload changes it for the node)."""
    global _node_budget
    if _node_budget is None:
        _node_budget = yamux.WindowBudget(config.node_recv_budget)
    else:
        _node_budget.limit = config.node_recv_budget
    return _node_budget


class _HeapTrim:
    """One pending heap trim per process, at most one per TRIM_INTERVAL."""

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._loop = None
        self._last = float("-inf")

    def request(self, loop) -> None:
        if self._handle is not None and self._loop is loop and not loop.is_closed():
            return
        self._loop = loop
        delay = max(TRIM_DELAY, self._last + TRIM_INTERVAL - loop.time())
        self._handle = loop.call_later(delay, self._run)

    def _run(self) -> None:
        self._handle = None
        self._last = self._loop.time()
        trim_heap()


_HEAP_TRIM = _HeapTrim()

_DataReceived = yamux.DataReceived
_WindowUpdated = yamux.WindowUpdated


class MuxStream:
    """One yamux stream: an ordered, flow-controlled byte pipe both ways."""

    __slots__ = (
        "_conn", "stream_id", "_chunks", "_buffered", "_eof", "_reset", "_local_closed",
        "_read_waiter", "_write_waiter", "_accepted", "_sink", "opened_at", "meter",
        "background", "__weakref__",
    )

    def __init__(self, conn: "MuxConnection", stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._eof = False
        self._reset = False
        self._local_closed = False
        self._read_waiter: asyncio.Future | None = None
        self._write_waiter: asyncio.Future | None = None
        self._accepted: asyncio.Future | None = None
        self._sink = None
        self.opened_at = 0.0
        # Counts the stream's bytes as they flow and hears when it ends:
        # ``sent(n)`` (toward the peer), ``received(n)``, ``ended()`` (once).
        # Set by whoever opened the stream (the gateway's stream seam).
        self.meter = None
        # A stream that lives as long as the link (a control stream): no
        # drain waits for it (``MuxConnection.drained``).
        self.background = False

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self._conn.session.stream_state(self.stream_id)}>"

    def set_background(self) -> None:
        """This stream lives as long as the link (a control stream): the
        connection's ``drained`` no longer waits for it."""
        self.background = True
        if self._conn._idle_waiters:
            self._conn._wake_if_idle()

    # -- events from the connection ----------------------------------------------

    def _feed(self, data: bytes) -> None:
        if self.meter is not None:
            self.meter.received(len(data))
        if self._sink is not None:
            self._sink.stream_data(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake_reader()

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_writer(self, exc: BaseException | None = None) -> None:
        w = self._write_waiter
        if w is not None and not w.done():
            if exc is None:
                w.set_result(None)
            else:
                w.set_exception(exc)

    def _on_end(self) -> None:
        self._eof = True
        self._wake_reader()
        if self._sink is not None:
            self._sink.stream_eof()

    def _on_window(self) -> None:
        if self._sink is not None:
            self._sink.stream_window()
        else:
            self._wake_writer()

    def _on_reset(self) -> None:
        self._reset = True
        self._eof = True
        self._wake_reader()
        if self._sink is not None:
            self._sink.stream_reset()
        self._wake_writer(StreamResetError(f"stream {self.stream_id} was reset"))
        self._settle_accept(StreamResetError(f"stream {self.stream_id} was refused or reset"))

    def _settle_accept(self, exc: BaseException | None) -> None:
        f = self._accepted
        if f is not None and not f.done():
            if exc is None:
                f.set_result(None)
            else:
                f.set_exception(exc)
                f.exception()  # retrieved: nobody may be waiting for it

    # -- reading -----------------------------------------------------------------------

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; b"" once the peer half-closed.

        Raises StreamResetError if the stream was reset before all data
        was read, SessionClosedError if the connection died.
        """
        while not self._chunks:
            if self._reset:
                raise StreamResetError(f"stream {self.stream_id} was reset")
            if self._eof:
                return b""
            if self._conn._closed:
                raise SessionClosedError("connection closed")
            self._read_waiter = self._conn._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes > 0:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        n = len(chunk)
        self._buffered -= n
        self._conn._consume(self.stream_id, n)
        return chunk

    async def read_message(self, limit: int = framing.MAX_MESSAGE) -> dict:
        """One length-prefixed message (relayd.core.framing) off the stream;
        FramingError if it is too large or not a msgpack map."""
        n = framing.message_length(await self.readexactly(4), limit)
        return framing.decode_body(await self.readexactly(n))

    async def messages(self, limit: int = framing.MAX_MESSAGE):
        """The stream's length-prefixed messages, until the peer's FIN."""
        while True:
            try:
                prefix = await self.readexactly(4)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                return
            n = framing.message_length(prefix, limit)
            yield framing.decode_body(await self.readexactly(n))

    async def readexactly(self, n: int) -> bytes:
        parts = []
        while n > 0:
            part = await self.read(n)
            if not part:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(part)
            n -= len(part)
        return b"".join(parts)

    # -- writing -----------------------------------------------------------------------

    async def write(self, data) -> None:
        """Send all of ``data``, waiting for window and transport as needed."""
        conn = self._conn
        view = memoryview(data)
        while True:
            if self._reset:
                raise StreamResetError(f"stream {self.stream_id} was reset")
            if conn._closed:
                raise SessionClosedError("connection closed")
            n = conn.session.send_data(self.stream_id, view)
            if n:
                conn._flush()
                view = view[n:]
                if self.meter is not None:
                    self.meter.sent(n)
            if not view:
                break
            if n == 0:
                # Out of window: wait for the peer's WindowUpdate.
                self._write_waiter = conn._loop.create_future()
                try:
                    await self._write_waiter
                finally:
                    self._write_waiter = None
        if conn._write_paused:
            await conn._drain()

    def write_eof(self) -> None:
        """Half-close: FIN. Reading goes on until the peer closes too."""
        if self._local_closed or self._reset or self._conn._closed:
            return
        self._local_closed = True
        self._conn.session.send_eof(self.stream_id)
        self._conn._flush()
        self._conn._maybe_forget(self)

    def reset(self) -> None:
        """Abort both directions (RST); buffered data is dropped."""
        if self._reset:
            return
        self._reset = True
        self._eof = True
        self._chunks.clear()
        self._buffered = 0
        conn = self._conn
        if not conn._closed:
            conn.session.reset_stream(self.stream_id)
            conn._flush()
        conn._forget(self.stream_id)
        self._wake_reader()
        self._wake_writer(StreamResetError(f"stream {self.stream_id} was reset"))

    # -- callback mode (splicing) ------------------------------------------------------------

    def attach(self, sink) -> None:
        """Deliver everything from now on to ``sink`` instead of ``read()``.

        ``sink`` has ``stream_data(bytes)``, ``stream_eof()``,
        ``stream_reset()`` and ``stream_window()``; it must call
        ``consumed(n)`` once it has passed data on (that returns window to
        the peer) and use ``send_nowait`` to write. Bytes already buffered
        are handed over first.
        """
        self._sink = sink
        while self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            sink.stream_data(chunk)
        if self._reset:
            sink.stream_reset()
        elif self._eof:
            sink.stream_eof()

    def consumed(self, n: int) -> None:
        """The sink has passed on ``n`` bytes (returns window to the peer)."""
        self._conn._consume(self.stream_id, n)

    def send_nowait(self, data) -> int:
        """Queue what the window allows of ``data``; returns bytes taken.

        Taking less than all means: wait for ``stream_window()``.
        """
        conn = self._conn
        if self._reset:
            raise StreamResetError(f"stream {self.stream_id} was reset")
        if conn._closed:
            raise SessionClosedError("connection closed")
        n = conn.session.send_data(self.stream_id, data)
        if n:
            conn._flush()
            if self.meter is not None:
                self.meter.sent(n)
        return n

    @property
    def link_write_paused(self) -> bool:
        """True while the connection's transport is above its high-water mark."""
        return self._conn._write_paused

    def on_link_resume(self, callback) -> None:
        """Call ``callback()`` once the connection's transport drains."""
        self._conn._resume_callbacks.append(callback)


class MuxConnection(asyncio.Protocol):
    """A yamux session over one transport (TCP, TLS or a WebSocket shim)."""

    def __init__(
        self,
        client: bool,
        config: MuxConfig | None = None,
        *,
        on_stream: Callable[[MuxStream], Awaitable[None]] | None = None,
        keepalive: bool = True,
        name: str = "",
        budget: "yamux.WindowBudget | None" = None,
    ) -> None:
        self.config = config or MuxConfig()
        # ``budget``: the node's receive budget, by default the process's own.
        self.session = yamux.Session(client, self.config, budget if budget is not None else node_budget(self.config))
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, MuxStream] = {}
        self._accept_queue: collections.deque[MuxStream] = collections.deque()
        self._accept_waiter: asyncio.Future | None = None
        self._on_stream = on_stream
        self._handler_tasks: set[asyncio.Task] = set()
        self._pings: dict[int, tuple[float, asyncio.Future]] = {}
        self._keepalive = keepalive
        self._keepalive_task: asyncio.Task | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        self._resume_callbacks: list = []
        self._flush_scheduled = False
        self._opening: dict[int, MuxStream] = {}
        self._idle_waiters: list[asyncio.Future] = []
        self._open_sweep: asyncio.TimerHandle | None = None
        self._closed = False
        self.closed_future: asyncio.Future = self._loop.create_future()
        self.error: BaseException | None = None
        self.rtt: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._trim_mark = 0  # bytes_in + bytes_out at the last trim request

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        if self._keepalive:
            self._keepalive_task = self._loop.create_task(self._keepalive_loop())

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        events = self.session.receive_data(data)
        streams = self._streams
        n = len(events)
        i = 0
        # Nothing a stream's sink or handler does may end the link by raising
        # into the transport: the event that failed costs its own stream only
        # (see _event_failed), and dispatch goes on with the next event. The
        # try block costs nothing until something raises.
        while i < n:
            try:
                while i < n:
                    ev = events[i]
                    i += 1
                    cls = type(ev)
                    if cls is _DataReceived:
                        st = streams.get(ev.stream_id)
                        if st is not None:
                            st._feed(ev.data)
                        else:  # nobody will read it: give the credit back
                            self.session.consume(ev.stream_id, len(ev.data))
                    elif cls is _WindowUpdated:
                        st = streams.get(ev.stream_id)
                        if st is not None:
                            st._on_window()
                    else:
                        self._control_event(ev)
            except Exception as exc:
                self._event_failed(events[i - 1], exc)
        self._flush_now()

    def _event_failed(self, ev, exc: BaseException) -> None:
        """A handler raised while taking ``ev``: a relayd bug, but one stream's.
        Count and log it, reset that stream and tell its sink; a failure
        outside any stream is logged and the link goes on (a protocol error
        still closes it)."""
        caught("mux_event", exc, conn=self.name, event=type(ev).__name__)
        if type(ev) is yamux.ProtocolErrorEvent:
            self._close_transport()
            return
        sid = getattr(ev, "stream_id", None)
        st = self._streams.get(sid) if sid is not None else None
        if st is not None:
            self._fail_stream(st)

    def _fail_stream(self, st: MuxStream) -> None:
        sink = st._sink
        st._sink = None
        st.reset()
        if sink is not None:
            try:
                sink.stream_reset()
            except Exception as exc:
                caught("mux_sink_reset", exc, conn=self.name)

    def _control_event(self, ev) -> None:
        cls = type(ev)
        sid = getattr(ev, "stream_id", None)
        st = self._streams.get(sid) if sid is not None else None
        if cls is yamux.StreamOpened:
            if self.session.stream_state(ev.stream_id) == "closed" or self.session.failed:
                # Opened and already reset in this same read, or the read
                # ended in a protocol error: nobody will ever serve it.
                return
            st = MuxStream(self, ev.stream_id)
            self._streams[ev.stream_id] = st
            if self._on_stream is not None:
                self.session.accept_stream(ev.stream_id)
                task = self._loop.create_task(self._run_handler(st))
                self._handler_tasks.add(task)
                task.add_done_callback(self._handler_tasks.discard)
            else:
                self._accept_queue.append(st)
                w = self._accept_waiter
                if w is not None and not w.done():
                    w.set_result(None)
        elif cls is yamux.StreamAccepted:
            self._opening.pop(ev.stream_id, None)
            if st is not None:
                st._settle_accept(None)
        elif cls is yamux.StreamEnded:
            if st is not None:
                st._on_end()
                self._maybe_forget(st)
        elif cls is yamux.StreamReset:
            if st is not None:
                self._forget(ev.stream_id)
                st._on_reset()
        elif cls is yamux.PongReceived:
            entry = self._pings.pop(ev.opaque, None)
            if entry is not None:
                sent, fut = entry
                rtt = time.monotonic() - sent
                self.rtt = rtt
                self.session.set_rtt(rtt)
                if not fut.done():
                    fut.set_result(rtt)
        elif cls is yamux.GoAwayReceived:
            log.info("peer sent GoAway", extra={"conn": self.name, "code": ev.code})
            w = self._accept_waiter
            if w is not None and not w.done():
                w.set_result(None)
        elif cls is yamux.ProtocolErrorEvent:
            self.error = ev.error
            kind = type(ev.error).__name__
            metrics.PROTOCOL_ERRORS.labels(kind).inc()
            _PROTOCOL_LOG.warning("protocol error from peer: %s: %s", kind, ev.error, extra={"conn": self.name})
            self._flush_now()  # the GoAway
            self._close_transport()

    async def _run_handler(self, st: MuxStream) -> None:
        try:
            await self._on_stream(st)
        except (StreamError, SessionClosedError, ConnectionError) as exc:
            log.debug("stream %d handler ended: %s", st.stream_id, exc)
            st.reset()
        except Exception:
            log.exception("stream %d handler failed", st.stream_id)
            st.reset()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        callbacks, self._resume_callbacks = self._resume_callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception as exc:
                caught("mux_resume", exc, conn=self.name)

    def connection_lost(self, exc) -> None:
        self._closed = True
        self.session.release_windows()
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self._open_sweep is not None:
            self._open_sweep.cancel()
        self._opening.clear()
        err = SessionClosedError("connection lost" + (f": {exc}" if exc else ""))
        for st in list(self._streams.values()):
            if not st._eof:
                st._reset = True
                st._eof = True
                if st._sink is not None:
                    try:
                        st._sink.stream_reset()
                    except Exception as exc:
                        caught("mux_sink_reset", exc, conn=self.name)
            st._wake_reader()
            st._wake_writer(err)
            st._settle_accept(err)
        for sid in list(self._streams):
            self._forget(sid)
        for _, fut in self._pings.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        self._pings.clear()
        self.resume_writing()
        w = self._accept_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if not self.closed_future.done():
            self.closed_future.set_result(self.error)

    # -- internals ---------------------------------------------------------------------

    def _flush(self) -> None:
        """Write queued frames soon: everything queued during this turn of
        the loop goes out as one write (one TLS record run, one syscall)
        instead of one per frame, which is what bounds connection rates."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        bufs = self.session.data_to_send_list()
        if bufs and self._transport is not None and not self._closed:
            n = 0
            for b in bufs:
                n += len(b)
            self.bytes_out += n
            if len(bufs) == 1:
                self._transport.write(bufs[0])
            else:
                self._transport.writelines(bufs)

    def _consume(self, stream_id: int, n: int) -> None:
        self.session.consume(stream_id, n, time.monotonic())
        self._flush()
        st = self._streams.get(stream_id)
        if st is not None:
            self._maybe_forget(st)

    def _maybe_forget(self, st: MuxStream) -> None:
        # A stream whose both directions are done and whose data is read
        # leaves the table; its object lives on only in the application.
        if st._eof and not st._chunks and self.session.stream_state(st.stream_id) == "closed":
            self._forget(st.stream_id)

    def _forget(self, stream_id: int) -> None:
        """The one way out of the stream table: tells the stream's meter,
        and whoever waits for the table to empty (``drained``)."""
        st = self._streams.pop(stream_id, None)
        if st is not None and st.meter is not None:
            meter, st.meter = st.meter, None
            try:
                meter.ended()
            except Exception as exc:
                caught("mux_meter", exc, conn=self.name)
        moved = self.bytes_in + self.bytes_out
        if moved - self._trim_mark >= TRIM_AFTER_BYTES and st is not None:
            self._trim_mark = moved
            _HEAP_TRIM.request(self._loop)
        if self._idle_waiters:
            self._wake_if_idle()

    def _busy(self) -> bool:
        """Some stream that a drain waits for is open (any but background)."""
        for st in self._streams.values():
            if not st.background:
                return True
        return False

    def _wake_if_idle(self) -> None:
        if not self._busy():
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def _drain(self) -> None:
        if not self._write_paused or self._closed:
            return
        fut = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def _close_transport(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    async def _keepalive_loop(self) -> None:
        cfg = self.config
        try:
            # One ping right away: the RTT estimate drives window growth.
            await self.ping(timeout=cfg.ping_timeout)
            while not self._closed:
                await asyncio.sleep(cfg.ping_interval)
                await self.ping(timeout=cfg.ping_timeout)
        except asyncio.TimeoutError:
            log.warning("keepalive: no pong within %.1fs, dropping link", cfg.ping_timeout,
                        extra={"conn": self.name})
            self.error = SessionClosedError("keepalive timeout")
            if self._transport is not None:
                self._transport.abort()
        except (SessionClosedError, asyncio.CancelledError):
            pass

    # -- public API ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def accepting_streams(self) -> bool:
        """False once either side sent GoAway (draining) or the link is gone."""
        s = self.session
        return not self._closed and s.local_go_away is None and s.remote_go_away is None

    async def drained(self, timeout: float) -> bool:
        """Wait until no stream is left (or the link is gone); False if
        ``timeout`` passed first. Background streams do not count: a
        control stream lives as long as the link, so waiting for it would
        make every drain last its whole time."""
        if self._closed or not self._busy():
            return True
        fut = self._loop.create_future()
        self._idle_waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except asyncio.TimeoutError:
            return not self._busy()

    async def open_stream(self) -> MuxStream:
        """Open a stream; it may be written to at once (yamux needs no wait).

        If the peer neither accepts nor refuses it within ``open_timeout``
        the stream is reset.
        """
        return self.open_stream_nowait()

    def open_stream_nowait(self) -> MuxStream:
        """``open_stream`` for callers outside a coroutine."""
        if self._closed:
            raise SessionClosedError("connection closed")
        sid = self.session.open_stream(time.monotonic())
        st = MuxStream(self, sid)
        st.opened_at = time.monotonic()
        st._accepted = self._loop.create_future()
        self._opening[sid] = st
        if self._open_sweep is None:
            self._open_sweep = self._loop.call_later(self.config.open_timeout, self._sweep_opening)
        self._streams[sid] = st
        self._flush()
        return st

    def _sweep_opening(self) -> None:
        # One timer for all streams awaiting their ACK, not one per stream.
        self._open_sweep = None
        deadline = time.monotonic() - self.config.open_timeout
        for sid, st in list(self._opening.items()):
            if st._accepted is None or st._accepted.done():
                del self._opening[sid]
            elif st.opened_at <= deadline:
                del self._opening[sid]
                log.warning("stream %d: no ACK within %.1fs, resetting", st.stream_id, self.config.open_timeout)
                st._settle_accept(asyncio.TimeoutError(f"stream {st.stream_id} open timed out"))
                st.reset()
        if self._opening and not self._closed:
            oldest = min(st.opened_at for st in self._opening.values())
            delay = max(0.05, oldest + self.config.open_timeout - time.monotonic())
            self._open_sweep = self._loop.call_later(delay, self._sweep_opening)

    async def accept_stream(self) -> MuxStream:
        """The next stream the peer opened (ACKed now that it is taken)."""
        while not self._accept_queue:
            if self._closed:
                raise SessionClosedError("connection closed")
            if self.session.remote_go_away is not None and not self._streams:
                raise SessionClosedError("peer sent GoAway")
            self._accept_waiter = self._loop.create_future()
            try:
                await self._accept_waiter
            finally:
                self._accept_waiter = None
        st = self._accept_queue.popleft()
        if not st._reset:
            self.session.accept_stream(st.stream_id)
            self._flush()
        return st

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time of one ping, in seconds."""
        if self._closed:
            raise SessionClosedError("connection closed")
        opaque = self.session.ping()
        fut = self._loop.create_future()
        self._pings[opaque] = (time.monotonic(), fut)
        self._flush()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(opaque, None)

    def go_away(self, code: int = yamux.GO_AWAY_NORMAL) -> None:
        """No more streams from the peer; existing ones go on."""
        if not self._closed:
            self.session.go_away(code)
            self._flush_now()

    async def close(self, code: int = yamux.GO_AWAY_NORMAL) -> None:
        """GoAway, then close the transport once written."""
        self.go_away(code)
        self._close_transport()
        await asyncio.shield(self.closed_future)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def connect(
    host: str, port: int, *, config: MuxConfig | None = None, ssl=None,
    on_stream=None, keepalive: bool = True, server_hostname: str | None = None,
) -> MuxConnection:
    """Dial ``host:port`` and run the client side of a yamux session."""
    loop = asyncio.get_running_loop()
    kwargs = {} if ssl is None else {"ssl": ssl, "server_hostname": server_hostname}
    _, proto = await loop.create_connection(
        lambda: MuxConnection(True, config, on_stream=on_stream, keepalive=keepalive, name=f"{host}:{port}"),
        host, port, **kwargs,
    )
    return proto


async def serve(
    host: str, port: int, on_connection: Callable[[MuxConnection], None], *,
    config: MuxConfig | None = None, ssl=None, on_stream=None, keepalive: bool = True,
) -> asyncio.AbstractServer:
    """Listen on ``host:port``; each connection is the server side of a session."""
    loop = asyncio.get_running_loop()

    def factory():
        conn = MuxConnection(False, config, on_stream=on_stream, keepalive=keepalive)
        loop.call_soon(on_connection, conn)
        return conn

    return await loop.create_server(factory, host, port, ssl=ssl)


__all__ = ["MuxConnection", "MuxStream", "connect", "node_budget", "serve", "ProtocolError"]
