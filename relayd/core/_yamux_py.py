"""yamux session, sans-I/O: bytes in, events and bytes out.

Theory of operation
-------------------
One ``Session`` object is one end of a yamux connection (the wire format of
hashicorp/yamux's spec.md). It never touches a socket or a clock on its own:

* ``receive_data(chunk)`` parses whatever bytes the transport delivered, in
  any split, and returns a list of events (frozen dataclasses below).
* Commands (``open_stream``, ``send_data``, ``send_eof``, ``reset_stream``,
  ``consume``, ``ping``, ``go_away``) change state and queue frames.
* ``data_to_send()`` hands out every queued outbound byte.

Every frame is a 12-byte header (version, type, flags, stream id, length),
followed for Data frames by ``length`` payload bytes. Payload is not buffered:
as soon as any part of a data frame's payload is in hand it is returned as a
``DataReceived`` event, so the parser holds at most 11 bytes of a split header
whatever the peer sends.

Flow control is per stream, credit based. The receive window starts at the
spec's 256 KiB. Received payload counts as *unconsumed* until the application
calls ``consume()``, i.e. until it has really passed the bytes on; only then
is credit returned with a WindowUpdate. A stalled consumer therefore stalls
its sender after one window, and nothing in the session grows without bound.
When the application consumes half a window faster than about four round
trips' worth of the window would allow, the window is the bottleneck
(bandwidth-delay product), so it doubles, up to ``MuxConfig.max_window``. The
round-trip time is supplied by the I/O layer (``set_rtt``), which times pings.

Window growth is paid from budgets, so that memory is bounded per link and
per node, not only per stream: every byte of window above a stream's initial
256 KiB is charged to the session (``MuxConfig.recv_budget``) and to an
optional ``WindowBudget`` shared by all sessions of the node. A window grows
only by what both still have, so one fast stream may take the whole budget
and many streams split it. A stream charges the larger of its target and
what the peer may still send plus what is unconsumed: yamux cannot take
credit back, so a window that shrinks frees its budget only as the peer uses
the credit it holds. Windows shrink (credit is withheld) when a stream's
consumer is far slower than its window and half a window took longer than
``MuxConfig.window_idle`` (an idle or slow stream), and, while
another stream waits for budget, when a stream holds more than its fair
share. A stream that can receive no more (the peer's FIN, a reset, the end)
returns its charge at once, and ``release_windows`` returns the session's
share of the node budget when its transport is gone.

A peer that breaks the protocol ends the session: the session queues a GoAway
with the protocol-error code, returns a ``ProtocolErrorEvent`` carrying an
error value from ``relayd.errors`` and ignores any further input. It never
raises into the I/O loop. Replies the peer can force us to queue (pongs,
refusals of excess streams) are capped between two ``data_to_send()`` calls;
beyond the cap the peer is flooding and the session ends with ``FloodError``.

This file is the one source of both builds: run as plain Python it is the
pure twin; compiled by Cython together with ``_ext/relayd/core/_yamux_c.pxd``
(which declares the C types) it is the fast build. ``cython.compiled`` guards
the few places where the two take a different road to the same bytes; the
differential tests hold them to identical events and output.
"""

from __future__ import annotations

import struct

import cython

from relayd.core.config import INITIAL_WINDOW, MuxConfig
from relayd.errors import (
    BadVersion,
    FloodError,
    FlowControlError,
    FrameTooLarge,
    InternalError,
    InvalidFlags,
    ProtocolError,
    SessionClosedError,
    StreamClosedError,
    StreamError,
    StreamIdError,
    UnknownFrameType,
    UnknownStreamError,
)

# --- wire constants (spec.md) ------------------------------------------------

PROTO_VERSION = 0
HEADER_SIZE = 12

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8
_FLAGS_KNOWN = 15

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

_MAX_U32 = 0xFFFFFFFF
_CACHE_SLOTS = 64  # a power of two
_BY_REFERENCE_MIN = 16384  # payloads this large are queued by reference
_HEADER = struct.Struct(">BBHII")

TYPE_NAMES = ("Data", "WindowUpdate", "Ping", "GoAway")

# --- stream states as a transition table ---------------------------------------
#
# A stream's life as one end sees it. ``awaiting_ack`` (we sent SYN, no ACK
# yet) and ``owe_ack`` (peer sent SYN, not accepted yet) are kept beside the
# state rather than multiplied into it: they do not change what may be sent.

OPEN = 1
LOCAL_CLOSED = 2  # we sent FIN, the peer may still send
REMOTE_CLOSED = 3  # the peer sent FIN, we may still send
CLOSED = 4  # both FINs: the stream is gone
RESET = 5  # RST either way: the stream is gone

STATE_NAMES = ("", "open", "local-closed", "remote-closed", "closed", "reset")

SEND_FIN = 0
RECV_FIN = 1
SEND_RST = 2
RECV_RST = 3

# (state, input) -> next state. A pair that is absent is not allowed.
# Data may be sent in OPEN/REMOTE_CLOSED and received in OPEN/LOCAL_CLOSED.
_TRANSITIONS = {
    (OPEN, SEND_FIN): LOCAL_CLOSED,
    (OPEN, RECV_FIN): REMOTE_CLOSED,
    (OPEN, SEND_RST): RESET,
    (OPEN, RECV_RST): RESET,
    (LOCAL_CLOSED, RECV_FIN): CLOSED,
    (LOCAL_CLOSED, SEND_RST): RESET,
    (LOCAL_CLOSED, RECV_RST): RESET,
    (REMOTE_CLOSED, SEND_FIN): CLOSED,
    (REMOTE_CLOSED, SEND_RST): RESET,
    (REMOTE_CLOSED, RECV_RST): RESET,
}


# --- frame codec ----------------------------------------------------------------


@cython.dataclasses.dataclass(frozen=True)
class FrameHeader:
    """One decoded 12-byte frame header."""

    version: int
    type: int
    flags: int
    stream_id: int
    length: int


def encode_header(type: int, flags: int, stream_id: int, length: int) -> bytes:
    """The 12 header bytes of one frame (version 0)."""
    return _pack_header(type, flags, stream_id, length)


def decode_header(data: bytes) -> FrameHeader:
    """Decode the first 12 bytes of ``data`` (no validation beyond size)."""
    if len(data) < HEADER_SIZE:
        raise ValueError(f"a frame header is {HEADER_SIZE} bytes, got {len(data)}")
    version, typ, flags, sid, length = _HEADER.unpack_from(data, 0)
    return FrameHeader(version, typ, flags, sid, length)


def _pack_header(typ: cython.int, flags: cython.int, sid: cython.uint, length: cython.uint) -> bytes:
    if cython.compiled:
        h: cython.uchar[12]
        h[0] = 0
        h[1] = typ
        h[2] = (flags >> 8) & 0xFF
        h[3] = flags & 0xFF
        h[4] = (sid >> 24) & 0xFF
        h[5] = (sid >> 16) & 0xFF
        h[6] = (sid >> 8) & 0xFF
        h[7] = sid & 0xFF
        h[8] = (length >> 24) & 0xFF
        h[9] = (length >> 16) & 0xFF
        h[10] = (length >> 8) & 0xFF
        h[11] = length & 0xFF
        return cython.cast(cython.p_uchar, h)[:12]
    else:
        return _HEADER.pack(0, typ, flags, sid, length)


# --- events -------------------------------------------------------------------


@cython.dataclasses.dataclass(frozen=True)
class StreamOpened:
    """The peer opened a stream (SYN). Accept it with ``accept_stream``."""

    stream_id: int


@cython.dataclasses.dataclass(frozen=True)
class StreamAccepted:
    """The peer acknowledged (ACK) a stream we opened."""

    stream_id: int


@cython.dataclasses.dataclass(frozen=True)
class DataReceived:
    """Payload for a stream; pass it on, then ``consume(len(data))``."""

    stream_id: int
    data: bytes


def _slice(buf: bytes, start: cython.Py_ssize_t, n: cython.Py_ssize_t) -> bytes:
    # Compiled, a bytes slice would go through slice objects and boxed ints;
    # copying from the char buffer makes the same bytes directly.
    if cython.compiled:
        if start == 0 and n == len(buf):
            return buf  # the middle of a large frame: no copy (as CPython does)
        return cython.cast(cython.p_char, buf)[start : start + n]
    else:
        return buf[start : start + n]


def _immutable(data) -> cython.bint:
    # Only bytes (or a read-only view of bytes) may be queued by reference:
    # a caller could change a bytearray before the queue is written out.
    if type(data) is bytes:
        return True
    return type(data) is memoryview and data.readonly and type(data.obj) is bytes


def _data_event(sid: cython.uint, data: bytes) -> DataReceived:
    # The one event made per data frame: compiled, skip the generic
    # constructor call (argument parsing) and fill the C fields directly.
    if cython.compiled:
        ev: DataReceived = DataReceived.__new__(DataReceived)
        ev.stream_id = sid
        ev.data = data
        return ev
    else:
        return DataReceived(sid, data)


@cython.dataclasses.dataclass(frozen=True)
class StreamEnded:
    """The peer half-closed the stream (FIN): no more data will come."""

    stream_id: int


@cython.dataclasses.dataclass(frozen=True)
class StreamReset:
    """The peer reset the stream (RST), or refused one we opened."""

    stream_id: int


@cython.dataclasses.dataclass(frozen=True)
class WindowUpdated:
    """The peer granted ``delta`` more bytes of send window on a stream."""

    stream_id: int
    delta: int


@cython.dataclasses.dataclass(frozen=True)
class PingReceived:
    """The peer pinged; the pong is already queued."""

    opaque: int


@cython.dataclasses.dataclass(frozen=True)
class PongReceived:
    """The peer answered one of our pings."""

    opaque: int


@cython.dataclasses.dataclass(frozen=True)
class GoAwayReceived:
    """The peer will accept no more streams; ``code`` says why."""

    code: int


@cython.dataclasses.dataclass(frozen=True)
class ProtocolErrorEvent:
    """The session ended because of ``error``; a GoAway is queued."""

    error: object


# --- streams and session ----------------------------------------------------------------


class WindowBudget:
    """Receive-window credit shared by several sessions (a node's total).

    ``used`` counts the window the sessions granted above their streams'
    initial 256 KiB; a session grows a window only while ``used`` stays
    within ``limit``. Sessions update ``used`` themselves; give each session
    a budget of its own build (compiled or pure).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"a budget cannot be negative ({limit})")
        self.limit = limit
        self.used = 0

    def available(self) -> int:
        """Bytes of window that may still be granted."""
        return self.limit - self.used if self.used < self.limit else 0


class _Stream:
    """Per-stream state; internal to the session."""

    def __init__(self, stream_id: cython.uint, now: cython.double) -> None:
        self.stream_id = stream_id
        self.state = OPEN
        self.awaiting_ack = False
        self.owe_ack = False
        self.send_window = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW
        self.target = INITIAL_WINDOW
        self.unconsumed = 0
        self.epoch_start = now
        # Window above INITIAL_WINDOW charged to the budgets, and whether the
        # stream wanted to grow and the budget had nothing left for it.
        self.charged = 0
        self.starved = False


class Session:
    """One end of a yamux session (sans-I/O).

    ``client=True`` for the side that dialed the connection: its streams have
    odd ids, the accepting side's even ids.
    """

    def __init__(
        self, client: bool, config: MuxConfig | None = None, node_budget: WindowBudget | None = None
    ) -> None:
        if config is None:
            config = MuxConfig()
        self.config = config
        self.client = client
        self._max_window = config.max_window
        self._recv_budget = config.recv_budget
        self._window_idle = config.window_idle
        self._node = node_budget
        self._budget_used = 0  # the sum of the streams' charges
        self._holders = 0  # streams with a charge
        self._starved = 0  # streams waiting for budget
        self._released = False
        self._max_frame_payload = config.max_frame_payload
        self._max_send_frame = config.max_send_frame
        self._max_streams = config.max_streams
        self._accept_backlog = config.accept_backlog
        self._max_pending_pongs = config.max_pending_pongs
        self._max_refused = config.max_refused_streams
        self._reset_memory = config.reset_memory

        self._streams = {}
        # Ids of streams we reset, so the peer's frames still in flight for
        # them are dropped quietly: a set for lookup plus a ring (grown
        # lazily up to reset_memory entries) that evicts the oldest in O(1).
        self._recently_reset = set()
        self._reset_ring = []
        self._reset_pos = 0
        self._out = bytearray()
        self._bufs = []  # output before _out: bytearrays and referenced payloads
        self._hdr = b""
        self._next_sid = 1 if client else 2
        # Highest id the peer has opened (its first id is 1 or 2).
        self._last_peer_sid = 0 if client else -1
        self._peer_gaps = set()
        self._unaccepted = 0
        self._pending_pongs = 0
        self._refused = 0
        self._ping_seq = 0
        self._pings_out = set()
        self._rtt = 0.0
        self._failed = False
        self._local_go_away = -1
        self._remote_go_away = -1
        # The data frame whose payload is still arriving.
        self._payload_left = 0
        self._cur_sid = 0
        self._cur_stream = None
        self._cur_flags = 0
        # Direct-mapped cache of live streams by id, in front of the dict:
        # data frames need their stream, and a few streams carry most data.
        self._cache = [None] * _CACHE_SLOTS

    # -- properties ----------------------------------------------------------

    @property
    def failed(self) -> bool:
        """True once a protocol error ended the session."""
        return self._failed

    @property
    def local_go_away(self) -> int | None:
        """The GoAway code we sent, or None."""
        return None if self._local_go_away < 0 else self._local_go_away

    @property
    def remote_go_away(self) -> int | None:
        """The GoAway code the peer sent, or None."""
        return None if self._remote_go_away < 0 else self._remote_go_away

    def stream_count(self) -> int:
        """Streams currently open in either direction."""
        return len(self._streams)

    def stream_ids(self) -> list:
        return list(self._streams)

    def stream_state(self, stream_id: int) -> str:
        """State name of a stream ("closed" once it is gone)."""
        st = self._streams.get(stream_id)
        if st is None:
            return "closed"
        return STATE_NAMES[st.state]

    def send_window(self, stream_id: int) -> int:
        """Bytes that may be sent on the stream now (0 if it cannot send)."""
        st = self._streams.get(stream_id)
        if st is None or not (st.state == OPEN or st.state == REMOTE_CLOSED):
            return 0
        return st.send_window

    def recv_window(self, stream_id: int) -> int:
        """Current receive window target of a stream."""
        st = self._streams.get(stream_id)
        return 0 if st is None else st.target

    def recv_budget_used(self) -> int:
        """Bytes of the session's receive budget in use: window granted above
        the initial 256 KiB of each stream, all streams together."""
        return self._budget_used

    def release_windows(self) -> None:
        """The transport is gone: give the session's share of the node budget
        back and grow no window any more. Idempotent."""
        if self._released:
            return
        self._released = True
        if self._node is not None:
            self._node.used -= self._budget_used
            self._node = None

    def set_rtt(self, rtt: float) -> None:
        """Tell the session the link's round-trip time (seconds)."""
        self._rtt = rtt if rtt > 0.0 else 0.0

    # -- output ------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Every outbound byte queued since the last call, as one buffer."""
        out = self._out
        self._out = bytearray()
        self._pending_pongs = 0
        self._refused = 0
        if self._bufs:
            self._bufs.append(out)
            out = b"".join(self._bufs)
            self._bufs = []
        return bytes(out)

    def data_to_send_list(self) -> list:
        """The same bytes as ``data_to_send`` as a list of buffers for
        ``transport.writelines``: large payloads of immutable input are
        referenced, not copied (the data plane's cheapest byte is the one
        never moved)."""
        bufs = self._bufs
        if self._out:
            bufs.append(self._out)
            self._out = bytearray()
        self._bufs = []
        self._pending_pongs = 0
        self._refused = 0
        return bufs

    def _frame(self, typ: cython.int, flags: cython.int, sid: cython.uint, length: cython.uint) -> None:
        self._out += _pack_header(typ, flags, sid, length)

    # -- commands ----------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._failed:
            raise SessionClosedError("the session ended after a protocol error")

    def open_stream(self, now: float = 0.0) -> int:
        """Open a stream (SYN); returns its id."""
        self._check_alive()
        if self._local_go_away >= 0:
            raise SessionClosedError("this side sent GoAway: no new streams")
        if self._remote_go_away >= 0:
            raise SessionClosedError("the peer sent GoAway: no new streams")
        if len(self._streams) >= self._max_streams:
            raise StreamError(f"stream limit reached ({self._max_streams} open)")
        sid = self._next_sid
        if sid > _MAX_U32 - 2:
            raise SessionClosedError("stream ids exhausted")
        self._next_sid = sid + 2
        st = _Stream(sid, now)
        st.awaiting_ack = True
        self._streams[sid] = st
        # The SYN rides on a window update that also grants any window above
        # the spec's initial 256 KiB right away.
        self._frame(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0)
        return sid

    def accept_stream(self, stream_id: int) -> bool:
        """Acknowledge a stream the peer opened (ACK); True if the ACK is queued.

        A stream that is already gone (the peer reset it, perhaps in the very
        read that opened it) or a session that has ended is a race with the
        peer, not a caller's mistake: nothing happens and the answer is False.
        """
        if self._failed:
            return False
        st = self._streams.get(stream_id)
        if st is None:
            return False
        if not st.owe_ack:
            raise StreamError(f"stream {stream_id} was not waiting to be accepted")
        self._frame(TYPE_WINDOW_UPDATE, self._ack_flag(st), st.stream_id, 0)
        return True

    def _ack_flag(self, st: _Stream) -> cython.int:
        if st.owe_ack:
            st.owe_ack = False
            self._unaccepted -= 1
            return FLAG_ACK
        return 0

    def _get(self, stream_id) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamError(f"stream {stream_id} is not open")
        return st

    def send_data(self, stream_id: int, data, end_stream: bool = False) -> int:
        """Queue as much of ``data`` as the peer's window allows.

        Returns the number of bytes taken; the caller keeps the rest until a
        ``WindowUpdated`` event. With ``end_stream`` the stream is half-closed
        once (and only if) all of ``data`` was taken.
        """
        self._check_alive()
        st = self._get(stream_id)
        if not (st.state == OPEN or st.state == REMOTE_CLOSED):
            raise StreamError(f"stream {stream_id} is {STATE_NAMES[st.state]}: cannot send")
        total: cython.Py_ssize_t = len(data)
        n: cython.Py_ssize_t = total
        if n > st.send_window:
            n = st.send_window
        pos: cython.Py_ssize_t = 0
        chunk: cython.Py_ssize_t
        by_ref: cython.bint = n >= _BY_REFERENCE_MIN and _immutable(data)
        while pos < n:
            chunk = n - pos
            if chunk > self._max_send_frame:
                chunk = self._max_send_frame
            self._frame(TYPE_DATA, self._ack_flag(st), st.stream_id, chunk)
            if by_ref:
                self._bufs.append(self._out)
                self._out = bytearray()
                if pos == 0 and chunk == total:
                    self._bufs.append(data)
                else:
                    self._bufs.append(memoryview(data)[pos : pos + chunk])
            elif pos == 0 and chunk == total:
                self._out += data
            else:
                self._out += data[pos : pos + chunk]
            pos += chunk
        st.send_window -= n
        if end_stream and n == total:
            # FIN goes in a frame of its own, never on the last data frame:
            # hashicorp/yamux before v0.1.2 can wake its reader on such a FIN
            # before copying that frame's data, losing the stream's tail.
            self._frame(TYPE_WINDOW_UPDATE, self._ack_flag(st) | FLAG_FIN, st.stream_id, 0)
            self._transition(st, SEND_FIN)
        return n

    def send_eof(self, stream_id: int) -> None:
        """Half-close the stream (FIN): we send no more data."""
        self._check_alive()
        st = self._get(stream_id)
        if not (st.state == OPEN or st.state == REMOTE_CLOSED):
            raise StreamError(f"stream {stream_id} is {STATE_NAMES[st.state]}: cannot close")
        self._frame(TYPE_WINDOW_UPDATE, self._ack_flag(st) | FLAG_FIN, st.stream_id, 0)
        self._transition(st, SEND_FIN)

    def reset_stream(self, stream_id: int) -> None:
        """Abort the stream both ways (RST). Unknown or closed ids are ignored."""
        if self._failed:
            return
        st = self._streams.get(stream_id)
        if st is None:
            return
        self._frame(TYPE_WINDOW_UPDATE, self._ack_flag(st) | FLAG_RST, st.stream_id, 0)
        self._transition(st, SEND_RST)

    def consume(self, stream_id: int, n: int, now: float = 0.0) -> None:
        """The application has passed on ``n`` received bytes of the stream.

        Returns credit to the peer (WindowUpdate) once half a window is
        consumed, grows the window when it limits throughput (within the
        budgets) and shrinks it when it is far larger than the stream's rate
        needs. ``now`` is a monotonic clock reading used only for that sizing.
        """
        if self._failed:
            return
        st = self._streams.get(stream_id)
        if st is None:
            return
        if n < 0 or n > st.unconsumed:
            raise StreamError(f"stream {stream_id}: consumed {n} bytes of {st.unconsumed} received")
        st.unconsumed -= n
        if st.state == REMOTE_CLOSED:
            return  # the peer sends nothing more: no credit needed
        delta: cython.longlong = st.target - st.recv_window - st.unconsumed
        if delta * 2 < st.target:
            return
        if self._rtt > 0.0:
            self._tune(st, now, delta)
            delta = st.target - st.recv_window - st.unconsumed
        st.epoch_start = now
        if delta > 0:
            st.recv_window += delta
            self._frame(TYPE_WINDOW_UPDATE, self._ack_flag(st), st.stream_id, delta)
        self._recharge(st)

    # -- window sizing and budgets -------------------------------------------------------

    def _tune(self, st: _Stream, now: cython.double, consumed: cython.longlong) -> None:
        """Resize the window once per epoch (half a window consumed)."""
        # If consuming that took less than 4 RTT x (the consumed fraction of
        # the window), the sender is window-bound: double the window, as far
        # as the budgets allow. If it took 4 times longer than that (the
        # window is 16 times what the stream's rate needs) and longer than
        # window_idle, the stream went idle or slow: halve it. The absolute
        # floor matters: the RTT comes from pings on a quiet moment, and a
        # loaded machine's scheduling hiccups must not undo growth.
        spent: cython.double = now - st.epoch_start
        bound: cython.double = 4.0 * self._rtt * consumed / st.target
        if spent < bound:
            if st.target < self._max_window and self._grow(st):
                return
        else:
            self._unstarve(st)
            if spent > 4.0 * bound and spent > self._window_idle:
                self._shrink(st, INITIAL_WINDOW)
        if self._starved and not st.starved and st.charged:
            # Another stream waits for budget: give back what is above an
            # equal share of the budget among the streams that want it.
            self._shrink(st, INITIAL_WINDOW + self._recv_budget // (self._holders + self._starved))

    def _grow(self, st: _Stream) -> cython.bint:
        """Double the target within max_window and the budgets; True if it grew."""
        if self._released:
            return False
        want: cython.longlong = self._max_window - st.target
        if want > st.target:
            want = st.target
        room: cython.longlong = self._recv_budget - self._budget_used
        if self._node is not None and self._node.limit - self._node.used < room:
            room = self._node.limit - self._node.used
        if room >= want:
            room = want
            self._unstarve(st)
        elif st.charged == 0 or st.charged * self._holders < self._budget_used:
            # Short of budget and holding less than the average: it waits
            # for a share, which makes the streams above an equal share
            # give back (see _tune).
            if not st.starved:
                st.starved = True
                self._starved += 1
        else:
            self._unstarve(st)
        if room <= 0:
            return False
        st.target += room
        return True

    def _shrink(self, st: _Stream, floor: cython.longlong) -> None:
        target: cython.longlong = st.target // 2
        if target < floor:
            target = floor
        if target < st.target:
            st.target = target

    def _unstarve(self, st: _Stream) -> None:
        if st.starved:
            st.starved = False
            self._starved -= 1

    def _recharge(self, st: _Stream) -> None:
        """Charge what the peer may still send plus what is unconsumed, or the
        target if larger: yamux cannot take credit back."""
        charge: cython.longlong = st.recv_window + st.unconsumed
        if charge < st.target:
            charge = st.target
        charge -= INITIAL_WINDOW
        if charge < 0:
            charge = 0
        self._set_charge(st, charge)

    def _set_charge(self, st: _Stream, charge: cython.longlong) -> None:
        diff: cython.longlong = charge - st.charged
        if diff == 0:
            return
        if st.charged == 0:
            self._holders += 1
        elif charge == 0:
            self._holders -= 1
        st.charged = charge
        self._budget_used += diff
        if self._node is not None:
            self._node.used += diff

    def _stop_receiving(self, st: _Stream) -> None:
        # No more data can come: the window is no longer needed.
        self._unstarve(st)
        self._set_charge(st, 0)
        st.target = INITIAL_WINDOW

    def ping(self) -> int:
        """Queue a ping; returns its opaque value (matched by PongReceived)."""
        self._check_alive()
        self._ping_seq = (self._ping_seq + 1) & _MAX_U32
        opaque = self._ping_seq
        if len(self._pings_out) >= 64:
            self._pings_out.clear()  # never answered: forget, do not grow
        self._pings_out.add(opaque)
        self._frame(TYPE_PING, FLAG_SYN, 0, opaque)
        return opaque

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Tell the peer we accept no more streams (existing ones go on)."""
        if self._failed or self._local_go_away >= 0:
            return
        if not 0 <= code <= 2:
            raise ValueError(f"GoAway code must be 0, 1 or 2, not {code}")
        self._local_go_away = code
        self._frame(TYPE_GO_AWAY, 0, 0, code)

    # -- state changes -------------------------------------------------------

    def _transition(self, st: _Stream, event: cython.int) -> None:
        nxt = _TRANSITIONS.get((st.state, event))
        if nxt is None:
            if event == RECV_FIN:
                raise StreamClosedError(
                    f"FIN on stream {st.stream_id} which is {STATE_NAMES[st.state]}"
                )
            raise StreamError(f"stream {st.stream_id} is {STATE_NAMES[st.state]}")
        st.state = nxt
        if nxt != LOCAL_CLOSED:
            self._stop_receiving(st)
        if nxt == CLOSED or nxt == RESET:
            self._remove(st, event == SEND_RST)

    def _remove(self, st: _Stream, locally_reset: cython.bint) -> None:
        sid = st.stream_id
        del self._streams[sid]
        if st.owe_ack:
            st.owe_ack = False
            self._unaccepted -= 1
        slot: cython.Py_ssize_t = (sid >> 1) & (_CACHE_SLOTS - 1)
        if self._cache[slot] is st:
            self._cache[slot] = None
        if locally_reset:
            self._remember_reset(sid)

    def _remember_reset(self, sid: cython.uint) -> None:
        if self._reset_memory <= 0:
            return
        if len(self._reset_ring) < self._reset_memory:
            self._reset_ring.append(sid)
        else:
            self._recently_reset.discard(self._reset_ring[self._reset_pos])
            self._reset_ring[self._reset_pos] = sid
            self._reset_pos = (self._reset_pos + 1) % self._reset_memory
        self._recently_reset.add(sid)

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data) -> list:
        """Parse bytes from the transport; returns the events they make."""
        events = []
        if self._failed:
            return events
        if type(data) is not bytes:
            data = bytes(data)
        try:
            self._parse(data, events)
        except ProtocolError as err:
            self._fail(err, events)
        except Exception as exc:  # a bug here must not take the loop down
            self._fail(InternalError(f"{type(exc).__name__} while parsing"), events)
        return events

    def _fail(self, err, events: list) -> None:
        self._failed = True
        self.release_windows()
        self._payload_left = 0
        self._cur_stream = None
        code = GO_AWAY_INTERNAL_ERROR if isinstance(err, InternalError) else GO_AWAY_PROTOCOL_ERROR
        if self._local_go_away < 0:
            self._local_go_away = code
        self._frame(TYPE_GO_AWAY, 0, 0, code)
        events.append(ProtocolErrorEvent(err))

    def _parse(self, data: bytes, events: list) -> None:
        pos: cython.Py_ssize_t = 0
        end: cython.Py_ssize_t = len(data)
        n: cython.Py_ssize_t
        hdr: bytes
        while pos < end:
            if self._payload_left:
                n = end - pos
                if n > self._payload_left:
                    n = self._payload_left
                if self._cur_stream is not None:
                    events.append(_data_event(self._cur_sid, _slice(data, pos, n)))
                pos += n
                self._payload_left -= n
                if self._payload_left == 0:
                    self._end_data_frame(events)
                continue
            if self._hdr:
                # Finish a header split across reads.
                n = HEADER_SIZE - len(self._hdr)
                if n > end - pos:
                    n = end - pos
                hdr = self._hdr + data[pos : pos + n]
                pos += n
                if len(hdr) < HEADER_SIZE:
                    self._hdr = hdr
                    return
                self._hdr = b""
                self._header(hdr, 0, events)
                continue
            if end - pos < HEADER_SIZE:
                self._hdr = data[pos:end]
                return
            pos = self._header(data, pos, events)

    def _header(self, buf: bytes, p: cython.Py_ssize_t, events: list) -> cython.Py_ssize_t:
        """Handle the header at buf[p:p+12]; returns the position after it
        (and after the payload too, when all of it is in ``buf``)."""
        version: cython.int
        typ: cython.int
        flags: cython.int
        sid: cython.uint
        length: cython.uint
        if cython.compiled:
            version = buf[p]
            typ = buf[p + 1]
            flags = (buf[p + 2] << 8) | buf[p + 3]
            sid = (
                (cython.cast(cython.uint, buf[p + 4]) << 24)
                | (buf[p + 5] << 16)
                | (buf[p + 6] << 8)
                | buf[p + 7]
            )
            length = (
                (cython.cast(cython.uint, buf[p + 8]) << 24)
                | (buf[p + 9] << 16)
                | (buf[p + 10] << 8)
                | buf[p + 11]
            )
        else:
            version, typ, flags, sid, length = _HEADER.unpack_from(buf, p)
        p += HEADER_SIZE
        if version != PROTO_VERSION:
            raise BadVersion(f"frame version {version}, expected {PROTO_VERSION}")
        if typ == TYPE_DATA:
            return self._data_frame(buf, p, flags, sid, length, events)
        if typ == TYPE_WINDOW_UPDATE:
            self._window_update(flags, sid, length, events)
        elif typ == TYPE_PING:
            self._ping_frame(flags, sid, length, events)
        elif typ == TYPE_GO_AWAY:
            self._go_away_frame(flags, sid, length, events)
        else:
            raise UnknownFrameType(f"frame type {typ} is not Data, WindowUpdate, Ping or GoAway")
        return p

    def _check_stream_flags(self, typ: cython.int, flags: cython.int, sid: cython.uint) -> None:
        if flags & ~_FLAGS_KNOWN:
            raise InvalidFlags(f"{TYPE_NAMES[typ]} frame with unknown flag bits {flags:#06x}")
        if (flags & FLAG_SYN) and (flags & (FLAG_ACK | FLAG_RST)):
            raise InvalidFlags(f"{TYPE_NAMES[typ]} frame with SYN and ACK/RST together")
        if sid == 0:
            raise StreamIdError(f"{TYPE_NAMES[typ]} frame on stream 0")

    def _lookup(self, typ: cython.int, flags: cython.int, sid: cython.uint, events: list) -> _Stream:
        """The stream a Data/WindowUpdate frame is for; opens it on SYN.

        None means the frame is for a stream that ended in a way that makes
        late frames legitimate, so they are dropped."""
        slot: cython.Py_ssize_t = (sid >> 1) & (_CACHE_SLOTS - 1)
        st: _Stream = self._cache[slot]
        if flags == 0 and st is not None and st.stream_id == sid:
            return st
        self._check_stream_flags(typ, flags, sid)
        if flags & FLAG_SYN:
            return self._incoming_stream(sid, events)
        st = self._streams.get(sid)
        if st is not None:
            self._cache[slot] = st
            return st
        ours: cython.bint = (sid & 1) == (1 if self.client else 0)
        if ours:
            if sid >= self._next_sid:
                raise UnknownStreamError(
                    f"{TYPE_NAMES[typ]} frame for stream {sid}, which this side never opened"
                )
        elif sid > self._last_peer_sid or sid in self._peer_gaps:
            raise UnknownStreamError(f"{TYPE_NAMES[typ]} frame for stream {sid} without SYN")
        return None

    def _incoming_stream(self, sid: cython.uint, events: list) -> _Stream:
        peer_parity = 0 if self.client else 1
        if (sid & 1) != peer_parity:
            raise StreamIdError(
                f"peer opened stream {sid}: its streams must be {'even' if self.client else 'odd'}"
            )
        # Peers allocate ids in order but may send SYNs out of order (Go opens
        # streams from concurrent goroutines), so ids skipped over are kept as
        # gaps that may still arrive once; anything else below the highest id
        # is a reuse. Outstanding gaps are capped at max_streams, so each id
        # costs O(1) amortised and the memory is bounded.
        if sid > self._last_peer_sid:
            skipped: cython.longlong = (sid - self._last_peer_sid) // 2 - 1
            if skipped + len(self._peer_gaps) > self._max_streams:
                raise StreamIdError(
                    f"peer stream id {sid} skips {skipped} ids ({len(self._peer_gaps)} still unopened)"
                )
            gap: cython.longlong = self._last_peer_sid + 2
            while gap < sid:
                self._peer_gaps.add(gap)
                gap += 2
            self._last_peer_sid = sid
        elif sid in self._peer_gaps:
            self._peer_gaps.discard(sid)
        else:
            raise StreamIdError(f"peer reused stream id {sid}")
        if (
            self._local_go_away >= 0
            or len(self._streams) >= self._max_streams
            or self._unaccepted >= self._accept_backlog
        ):
            self._refused += 1
            if self._refused > self._max_refused:
                raise FloodError(f"peer opened streams faster than refusals drain ({self._refused})")
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
            self._remember_reset(sid)
            return None
        st = _Stream(sid, 0.0)
        st.owe_ack = True
        self._unaccepted += 1
        self._streams[sid] = st
        self._cache[(sid >> 1) & (_CACHE_SLOTS - 1)] = st
        events.append(StreamOpened(sid))
        return st

    def _stream_flags(self, st: _Stream, flags: cython.int, events: list) -> cython.bint:
        """ACK and RST of a Data/WindowUpdate frame; True if the stream is gone."""
        if flags & FLAG_ACK:
            if not st.awaiting_ack:
                raise InvalidFlags(f"ACK on stream {st.stream_id}, which expected none")
            st.awaiting_ack = False
            events.append(StreamAccepted(st.stream_id))
        if flags & FLAG_RST:
            self._transition(st, RECV_RST)
            events.append(StreamReset(st.stream_id))
            return True
        return False

    def _data_frame(
        self,
        buf: bytes,
        p: cython.Py_ssize_t,
        flags: cython.int,
        sid: cython.uint,
        length: cython.uint,
        events: list,
    ) -> cython.Py_ssize_t:
        if length > self._max_frame_payload:
            raise FrameTooLarge(
                f"data frame of {length} bytes on stream {sid}, limit {self._max_frame_payload}"
            )
        st = self._lookup(TYPE_DATA, flags, sid, events)
        if st is not None and flags:
            if self._stream_flags(st, flags, events):
                st = None  # reset: drop its payload
        if st is not None:
            if length:
                if not (st.state == OPEN or st.state == LOCAL_CLOSED):
                    raise StreamClosedError(
                        f"data on stream {sid} after the peer's FIN ({STATE_NAMES[st.state]})"
                    )
                if length > st.recv_window:
                    raise FlowControlError(
                        f"{length} bytes on stream {sid} beyond its window of {st.recv_window}"
                    )
                st.recv_window -= length
                st.unconsumed += length
        elif length and not (flags & (FLAG_RST | FLAG_SYN)) and sid not in self._recently_reset:
            # (a refused SYN's payload is dropped like a reset stream's)
            raise StreamClosedError(f"data on stream {sid}, which had closed")
        avail: cython.Py_ssize_t = len(buf) - p
        if length <= avail:
            # Fast path: the whole payload is in this chunk.
            if st is not None:
                if length:
                    events.append(_data_event(sid, _slice(buf, p, length)))
                if flags & FLAG_FIN:
                    self._transition(st, RECV_FIN)
                    events.append(StreamEnded(sid))
            return p + length
        self._payload_left = length
        self._cur_sid = sid
        self._cur_stream = st
        self._cur_flags = flags
        return p

    def _end_data_frame(self, events: list) -> None:
        st = self._cur_stream
        self._cur_stream = None
        if st is not None and self._cur_flags & FLAG_FIN:
            if st.stream_id in self._streams:
                self._transition(st, RECV_FIN)
                events.append(StreamEnded(st.stream_id))

    def _window_update(self, flags: cython.int, sid: cython.uint, delta: cython.uint, events: list) -> None:
        st = self._lookup(TYPE_WINDOW_UPDATE, flags, sid, events)
        if st is None:
            return  # late update for a finished stream: harmless
        if flags and self._stream_flags(st, flags, events):
            return
        if delta:
            window: cython.longlong = st.send_window + delta
            if window > _MAX_U32:
                raise FlowControlError(f"window update on stream {sid} overflows ({window} bytes)")
            st.send_window = window
            if st.state == OPEN or st.state == REMOTE_CLOSED:
                events.append(WindowUpdated(sid, delta))
        if flags & FLAG_FIN:
            self._transition(st, RECV_FIN)
            events.append(StreamEnded(sid))

    def _ping_frame(self, flags: cython.int, sid: cython.uint, opaque: cython.uint, events: list) -> None:
        if sid != 0:
            raise StreamIdError(f"Ping frame on stream {sid}, must be 0")
        if flags == FLAG_SYN:
            self._pending_pongs += 1
            if self._pending_pongs > self._max_pending_pongs:
                raise FloodError(f"more than {self._max_pending_pongs} pings awaiting pongs")
            self._frame(TYPE_PING, FLAG_ACK, 0, opaque)
            events.append(PingReceived(opaque))
        elif flags == FLAG_ACK:
            if opaque in self._pings_out:
                self._pings_out.discard(opaque)
                events.append(PongReceived(opaque))
        else:
            raise InvalidFlags(f"Ping frame with flags {flags:#06x}, must be SYN or ACK")

    def _go_away_frame(self, flags: cython.int, sid: cython.uint, code: cython.uint, events: list) -> None:
        if sid != 0:
            raise StreamIdError(f"GoAway frame on stream {sid}, must be 0")
        if flags != 0:
            raise InvalidFlags(f"GoAway frame with flags {flags:#06x}")
        if code > 2:
            raise ProtocolError(f"GoAway with unknown code {code}")
        self._remote_go_away = code
        events.append(GoAwayReceived(code))


EVENT_TYPES = (
    StreamOpened,
    StreamAccepted,
    DataReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
    PingReceived,
    PongReceived,
    GoAwayReceived,
    ProtocolErrorEvent,
)
