# Cython contract of relayd/core/_yamux_py.py, compiled as relayd.core._yamux_c.
#
# setup.py copies the pure module to _ext/relayd/core/_yamux_c.py and Cython
# augments it with this file. The path must mirror the package path (with
# __init__.pxd files above it) or Cython silently ignores this file and
# builds slow Python classes; tests/core/test_build.py guards against that.

import cython

cdef int PROTO_VERSION, HEADER_SIZE
cdef int TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY
cdef int FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST, _FLAGS_KNOWN
cdef int GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR, GO_AWAY_INTERNAL_ERROR
cdef int OPEN, LOCAL_CLOSED, REMOTE_CLOSED, CLOSED, RESET
cdef int SEND_FIN, RECV_FIN, SEND_RST, RECV_RST
cdef long long _MAX_U32
cdef Py_ssize_t _CACHE_SLOTS
cdef Py_ssize_t _BY_REFERENCE_MIN
cdef long long INITIAL_WINDOW

cdef bytes _pack_header(int typ, int flags, unsigned int sid, unsigned int length)

@cython.dataclasses.dataclass(frozen=True)
cdef class FrameHeader:
    cdef readonly int version
    cdef readonly int type
    cdef readonly int flags
    cdef readonly unsigned int stream_id
    cdef readonly unsigned int length

@cython.dataclasses.dataclass(frozen=True)
cdef class StreamOpened:
    cdef readonly unsigned int stream_id

@cython.dataclasses.dataclass(frozen=True)
cdef class StreamAccepted:
    cdef readonly unsigned int stream_id

@cython.dataclasses.dataclass(frozen=True)
@cython.freelist(512)
@cython.no_gc
@cython.final
cdef class DataReceived:
    cdef readonly unsigned int stream_id
    cdef readonly bytes data

cdef DataReceived _data_event(unsigned int sid, bytes data)
cdef bytes _slice(bytes buf, Py_ssize_t start, Py_ssize_t n)
cdef bint _immutable(data) except -1

@cython.dataclasses.dataclass(frozen=True)
cdef class StreamEnded:
    cdef readonly unsigned int stream_id

@cython.dataclasses.dataclass(frozen=True)
cdef class StreamReset:
    cdef readonly unsigned int stream_id

@cython.dataclasses.dataclass(frozen=True)
cdef class WindowUpdated:
    cdef readonly unsigned int stream_id
    cdef readonly unsigned int delta

@cython.dataclasses.dataclass(frozen=True)
cdef class PingReceived:
    cdef readonly unsigned int opaque

@cython.dataclasses.dataclass(frozen=True)
cdef class PongReceived:
    cdef readonly unsigned int opaque

@cython.dataclasses.dataclass(frozen=True)
cdef class GoAwayReceived:
    cdef readonly unsigned int code

@cython.dataclasses.dataclass(frozen=True)
cdef class ProtocolErrorEvent:
    cdef readonly object error


cdef class WindowBudget:
    cdef public long long limit
    cdef public long long used


@cython.final
cdef class _Stream:
    cdef public unsigned int stream_id
    cdef public int state
    cdef public bint awaiting_ack
    cdef public bint owe_ack
    cdef public long long send_window
    cdef public long long recv_window
    cdef public long long target
    cdef public long long unconsumed
    cdef public double epoch_start
    cdef public long long charged
    cdef public bint starved


@cython.final
cdef class Session:
    cdef readonly object config
    cdef readonly bint client
    cdef long long _max_window
    cdef long long _recv_budget
    cdef double _window_idle
    cdef WindowBudget _node
    cdef long long _budget_used
    cdef Py_ssize_t _holders
    cdef Py_ssize_t _starved
    cdef bint _released
    cdef long long _max_frame_payload
    cdef Py_ssize_t _max_send_frame
    cdef Py_ssize_t _max_streams
    cdef Py_ssize_t _accept_backlog
    cdef Py_ssize_t _max_pending_pongs
    cdef Py_ssize_t _max_refused
    cdef Py_ssize_t _reset_memory
    cdef dict _streams
    cdef set _recently_reset
    cdef list _reset_ring
    cdef Py_ssize_t _reset_pos
    cdef set _peer_gaps
    cdef bytearray _out
    cdef list _bufs
    cdef bytes _hdr
    cdef long long _next_sid
    cdef long long _last_peer_sid
    cdef Py_ssize_t _unaccepted
    cdef Py_ssize_t _pending_pongs
    cdef Py_ssize_t _refused
    cdef long long _ping_seq
    cdef set _pings_out
    cdef double _rtt
    cdef bint _failed
    cdef int _local_go_away
    cdef int _remote_go_away
    cdef long long _payload_left
    cdef unsigned int _cur_sid
    cdef _Stream _cur_stream
    cdef int _cur_flags
    cdef list _cache

    cdef void _frame(self, int typ, int flags, unsigned int sid, unsigned int length) except *
    cdef void _check_alive(self) except *
    cdef int _ack_flag(self, _Stream st) noexcept
    cdef _Stream _get(self, stream_id)
    @cython.locals(spent=double, bound=double)
    cdef void _tune(self, _Stream st, double now, long long consumed) except *
    @cython.locals(want="long long", room="long long")
    cdef bint _grow(self, _Stream st) except -1
    @cython.locals(target="long long")
    cdef void _shrink(self, _Stream st, long long floor) noexcept
    cdef void _unstarve(self, _Stream st) noexcept
    @cython.locals(charge="long long")
    cdef void _recharge(self, _Stream st) noexcept
    @cython.locals(diff="long long")
    cdef void _set_charge(self, _Stream st, long long charge) noexcept
    cdef void _stop_receiving(self, _Stream st) noexcept
    cdef void _transition(self, _Stream st, int event) except *
    @cython.locals(slot=Py_ssize_t)
    cdef void _remove(self, _Stream st, bint locally_reset) except *
    cdef void _remember_reset(self, unsigned int sid) except *
    cdef void _fail(self, err, list events) except *
    @cython.locals(hdr=bytes)
    cdef void _parse(self, bytes data, list events) except *
    @cython.locals(version=int, typ=int, flags=int, sid="unsigned int", length="unsigned int")
    cdef Py_ssize_t _header(self, bytes buf, Py_ssize_t p, list events) except -1
    cdef void _check_stream_flags(self, int typ, int flags, unsigned int sid) except *
    @cython.locals(ours=bint, slot=Py_ssize_t, st=_Stream)
    cdef _Stream _lookup(self, int typ, int flags, unsigned int sid, list events)
    @cython.locals(skipped="long long", gap="long long")
    cdef _Stream _incoming_stream(self, unsigned int sid, list events)
    cdef bint _stream_flags(self, _Stream st, int flags, list events) except -1
    @cython.locals(avail=Py_ssize_t)
    cdef Py_ssize_t _data_frame(self, bytes buf, Py_ssize_t p, int flags, unsigned int sid, unsigned int length, list events) except -1
    cdef void _end_data_frame(self, list events) except *
    @cython.locals(window="long long")
    cdef void _window_update(self, int flags, unsigned int sid, unsigned int delta, list events) except *
    cdef void _ping_frame(self, int flags, unsigned int sid, unsigned int opaque, list events) except *
    cdef void _go_away_frame(self, int flags, unsigned int sid, unsigned int code, list events) except *
