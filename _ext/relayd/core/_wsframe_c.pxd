# Cython contract of relayd/core/_wsframe_py.py, compiled as relayd.core._wsframe_c
# (see _yamux_c.pxd for how the one-source build works).

import cython
from libc.string cimport memcpy

cdef int OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG
cdef int CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_INVALID_DATA, CLOSE_TOO_BIG
cdef long long _MAX_CONTROL

@cython.locals(n=Py_ssize_t, out=bytes, src="unsigned char *", dst="unsigned char *", k="unsigned char *",
               i=Py_ssize_t, word="unsigned long long", chunk="unsigned long long")
cpdef bytes mask(bytes data, bytes key, Py_ssize_t offset=*)

@cython.dataclasses.dataclass(frozen=True)
@cython.final
cdef class DataFrame:
    cdef readonly int opcode
    cdef readonly bytes data
    cdef readonly bint fin

@cython.dataclasses.dataclass(frozen=True)
cdef class Ping:
    cdef readonly bytes data

@cython.dataclasses.dataclass(frozen=True)
cdef class Pong:
    cdef readonly bytes data

@cython.dataclasses.dataclass(frozen=True)
cdef class Close:
    cdef readonly int code
    cdef readonly str reason

@cython.dataclasses.dataclass(frozen=True)
cdef class WsProtocolError:
    cdef readonly object error
    cdef readonly int close_code

@cython.final
cdef class FrameParser:
    cdef readonly bint server
    cdef readonly long long max_message
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
cdef Close _parse_close(bytes payload)
