# Cython contract of relayd/core/_wsframe_py.py, compiled as relayd.core._wsframe_c
# (see _yamux_c.pxd for how the one-source build works). The events are not
# here: they are plain Python classes of relayd.core.ws_events, shared by
# both builds.

import cython
from libc.string cimport memcpy

cdef int OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG
cdef int CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED, CLOSE_NO_STATUS
cdef int CLOSE_ABNORMAL, CLOSE_INVALID_DATA, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_INTERNAL
cdef int OPEN, CLOSING, CLOSED
cdef long long _MAX_CONTROL

@cython.locals(n=Py_ssize_t, out=bytes, src="unsigned char *", dst="unsigned char *", k="unsigned char *",
               i=Py_ssize_t, word="unsigned long long", chunk="unsigned long long")
cpdef bytes mask(bytes data, bytes key, Py_ssize_t offset=*)

cpdef bint close_code_allowed(int code)

@cython.final
cdef class FrameParser:
    cdef readonly bint server
    cdef readonly long long max_message
    cdef readonly long long max_frame
    cdef bytes _hdr
    cdef long long _left
    cdef int _opcode
    cdef bint _fin
    cdef bint _masked
    cdef bytes _key
    cdef Py_ssize_t _key_pos
    cdef bytes _control
    cdef int _msg_opcode
    cdef long long _msg_size
    cdef object _utf8
    cdef bint _failed

    cpdef list feed(self, data)
    cdef void _fail(self, err, int code, list events) except *
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, n=Py_ssize_t, hdr=bytes, need=Py_ssize_t)
    cdef void _parse(self, bytes data, list events) except *
    @cython.locals(b0=int, b1=int, opcode=int, fin=bint, masked=bint, short=int, length="long long", p=Py_ssize_t)
    cdef void _header(self, bytes h, list events) except *
    @cython.locals(last=bint)
    cdef void _payload(self, bytes part, list events) except *
    @cython.locals(op=int)
    cdef void _frame_done(self, bytes payload, list events) except *

@cython.locals(short=int, size=Py_ssize_t)
cdef Py_ssize_t _header_size(bytes h) except -2
@cython.locals(code=int)
cdef object _parse_close(bytes payload)


@cython.final
cdef class Connection:
    cdef readonly bint client
    cdef readonly object config
    cdef readonly bint assemble
    cdef readonly int state
    cdef readonly int close_code
    cdef readonly str close_reason
    cdef readonly int close_sent
    cdef readonly object error
    cdef FrameParser _parser
    cdef Py_ssize_t _max_buffered
    cdef object _random
    cdef list _out
    cdef Py_ssize_t _out_size
    cdef int _sending
    cdef list _parts
    cdef bint _discard
    cdef bint _eof

    @cython.locals(pevs=list, n=Py_ssize_t, i=Py_ssize_t)
    cpdef list receive_data(self, data)
    cdef void _assemble(self, ev, list events) except *
    cdef void _close_received(self, ev, list events) except *
    cdef void _protocol_error(self, err, int code, list events) except *
    @cython.locals(n=Py_ssize_t)
    cdef void _send_data(self, int opcode, data, bint fin) except *
    @cython.locals(n=Py_ssize_t)
    cdef void _queue_frame(self, int opcode, data, bint fin) except *
    cpdef bytes data_to_send(self)
    cpdef list data_to_send_list(self)
