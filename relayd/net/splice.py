"""Splicing a TCP connection and a mux stream, with back-pressure both ways.

``TcpSplice`` is the ``asyncio.Protocol`` of the TCP side (a public client at
the relay, the local service at the agent) and the sink of the mux stream:

* TCP -> stream: bytes go out as far as the stream's send window allows; the
  rest waits and TCP reading pauses until a WindowUpdate, or while the agent
  link's own transport is above its high-water mark.
* stream -> TCP: bytes are written to the TCP transport; their window credit
  goes back to the peer only once that transport is below its high-water
  mark. A slow TCP reader therefore holds at most one window plus the
  transport's buffer, whatever the sender does.
* FIN both ways as half-closes; a reset or a lost link aborts the TCP side
  with RST (never a FIN that would make a cut transfer look complete).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from relayd.core.config import SPLICE, SpliceConfig
from relayd.errors import RelaydError
from relayd.net import abort_with_reset

log = logging.getLogger("relayd.splice")



class TcpSplice(asyncio.Protocol):
    __slots__ = (
        "stream", "transport", "_pending", "_reading_paused", "_write_paused", "_deferred",
        "_tcp_eof", "_stream_eof", "_fin_sent", "_done", "on_close", "_max_pending", "_max_held",
    )

    def __init__(self, stream=None, *, on_close: Callable | None = None, limits: SpliceConfig = SPLICE) -> None:
        self._max_pending = limits.max_pending
        self._max_held = limits.max_held
        self.stream = None
        self.transport: asyncio.Transport | None = None
        self._pending: bytes | None = None
        self._reading_paused = False
        self._write_paused = False
        self._deferred = 0
        self._tcp_eof = False
        self._stream_eof = False
        self._fin_sent = False
        self._done = False
        self.on_close = on_close
        if stream is not None:
            self.stream = stream

    # -- binding -----------------------------------------------------------------

    def bind(self, stream) -> None:
        """Join ``stream``; starts reading the TCP side."""
        self.stream = stream
        stream.attach(self)
        if self._pending is not None:
            self.stream_window()  # bytes that arrived before the stream existed (then the FIN)
        elif self._tcp_eof:
            self._send_fin()  # the client half-closed while waiting for its stream
        elif self.transport is not None and not self._done:
            self._resume_reading()

    # -- TCP side ------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        # Without a stream yet (held for an agent) reading goes on, so that a
        # client who leaves is noticed; what it sends is held, up to
        # max_held (SpliceConfig), then reading pauses until bind().
        self.transport = transport
        if self.stream is not None:
            self.stream.attach(self)

    def data_received(self, data: bytes) -> None:
        if self._pending is not None or self.stream is None:
            # Held: waiting for the stream or its window (reading is paused
            # then; only what was already in flight lands here).
            self._pending = data if self._pending is None else self._pending + data
            if len(self._pending) > self._max_pending:
                log.warning("peer kept sending while paused; closing", extra={"pending": len(self._pending)})
                self._abort()
            elif self.stream is None and len(self._pending) > self._max_held:
                self._pause_reading()
            return
        self._send(data)

    def _send(self, data) -> None:
        try:
            n = self.stream.send_nowait(data)
        except RelaydError:
            self._pending = None
            self._abort()
            return
        if n < len(data):
            self._pending = bytes(data[n:])
            self._pause_reading()
        elif self.stream.link_write_paused:
            self._pause_reading()
            self.stream.on_link_resume(self._link_resumed)

    def _link_resumed(self) -> None:
        if self._pending is None and not self._done:
            self._resume_reading()

    def eof_received(self) -> bool | None:
        self._tcp_eof = True
        if self._pending is None and self.stream is not None:
            self._send_fin()
        # Keep our writing side open (half-close); TLS transports cannot.
        return None if self.transport.get_extra_info("sslcontext") is not None else True

    def _send_fin(self) -> None:
        if self._fin_sent or self.stream is None:
            return
        self._fin_sent = True
        try:
            self.stream.write_eof()
        except RelaydError:
            pass
        self._maybe_finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._deferred and self.stream is not None:
            n, self._deferred = self._deferred, 0
            self.stream.consumed(n)

    def connection_lost(self, exc) -> None:
        was_done = self._done
        self._done = True
        if self.stream is not None and not was_done:
            if exc is not None or not self._tcp_eof:
                self.stream.reset()
            elif self._pending is None:
                self._send_fin()
            # else: an orderly close (TLS services close rather than
            # half-close) with bytes still waiting for window: stream_window
            # sends them, then the FIN.
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self)

    # -- stream side (sink) ---------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self._done:
            self.stream.consumed(len(data))
            return
        self.transport.write(data)
        n = len(data)
        if self._write_paused:
            self._deferred += n
        else:
            self.stream.consumed(n)

    def stream_window(self) -> None:
        if self._pending is None or (self._done and not self._tcp_eof):
            return
        data, self._pending = self._pending, None
        self._send(data)
        if self._pending is None:
            if self._tcp_eof:
                self._send_fin()
            elif not self.stream.link_write_paused:
                self._resume_reading()

    def stream_eof(self) -> None:
        self._stream_eof = True
        if self._done:
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_finish()

    def stream_reset(self) -> None:
        self._abort()

    # -- helpers ------------------------------------------------------------------

    def _maybe_finish(self) -> None:
        if self._fin_sent and self._stream_eof and not self._done:
            self.transport.close()
        elif self._stream_eof and not self.transport.can_write_eof() and not self._done:
            # TLS transports cannot half-close: finish once we are done too.
            if self._fin_sent:
                self.transport.close()

    def _abort(self) -> None:
        # An abnormal end (reset, lost link, no agent, a stalled peer): the
        # TCP peer gets RST, so a transfer cut short never looks complete.
        if self.transport is not None and not self._done:
            abort_with_reset(self.transport)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._done:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._done:
            self._reading_paused = False
            self.transport.resume_reading()
