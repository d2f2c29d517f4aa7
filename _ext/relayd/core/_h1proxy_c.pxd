# Cython contract of relayd/core/_h1proxy_py.py, compiled as
# relayd.core._h1proxy_c (see _yamux_c.pxd for how the one-source build
# works). Fields are private unless marked readonly (what the adapter and
# the tests read); nothing is writable from Python but Request.route, the
# adapter's routing decision. The two sides' states are C enums; the pure
# module defines the same names as ints (under ``if not cython.compiled``)
# and tests/core/test_h1proxy.py checks both builds name every state alike.

import cython

cdef enum ClientState:
    C_HEAD = 0
    C_LENGTH = 1
    C_CHUNKED = 2
    C_UPGRADE = 3
    C_CLOSED = 4

cdef enum ServiceState:
    S_IDLE = 0
    S_HEAD = 1
    S_LENGTH = 2
    S_CHUNKED = 3
    S_CLOSE = 4
    S_RAW = 5
    S_CLOSED = 6

cdef int EV_START, EV_UPSTREAM, EV_COMPLETE, EV_CLIENT, EV_DONE, EV_DROP, EV_CLOSE, EV_ABORT, EV_FAIL
cdef int EV_NOTE, EV_RETRY
cdef int CI_HEAD, CI_HEAD_LENGTH, CI_HEAD_CHUNKED, CI_HEAD_UPGRADE, CI_BODY_END, CI_FAIL
cdef int SI_START, SI_INTERIM, SI_HEAD_EMPTY, SI_HEAD_LENGTH, SI_HEAD_CHUNKED, SI_HEAD_CLOSE, SI_HEAD_SWITCH
cdef int SI_BODY_END, SI_RETRY, SI_FAIL
cdef int _CH_SIZE, _CH_EXT, _CH_SIZE_LF, _CH_DATA, _CH_DATA_CR, _CH_DATA_LF, _CH_TRAILER, _CH_FIELD
cdef int _CH_FIELD_LF, _CH_END_LF, _CH_DONE
cdef tuple CLIENT_TABLE, SERVICE_TABLE
cdef dict _REQ_SPECIAL, _HEAD_CACHE
cdef frozenset _NEVER_NAMED, _METHODS, _IDEMPOTENT, _RESP_FIRST, _PLAIN_CONNECTION, _NO_TOKENS, HOP_BY_HOP
cdef object _RESP_HEAD, _REQ_HEAD, _ENCODED_DOT


@cython.final
cdef class Request:
    cdef readonly bytes method, url, version, host, path, upstream_head
    cdef readonly list headers, body
    cdef readonly bint chunked, upgrade, head_only, keep_alive, expect_continue, last_upstream
    cdef readonly bint complete, has_body, retried
    cdef readonly Py_ssize_t body_bytes
    cdef public object route


@cython.final
cdef class ChunkedEnd:
    cdef long long max_line, max_trailers, left, line
    cdef int state, digits
    cdef bint colon

    @cython.locals(i=Py_ssize_t, n=Py_ssize_t, take=Py_ssize_t, c=int, state=int)
    cpdef Py_ssize_t feed(self, bytes data, list pieces) except -3


@cython.final
cdef class Framing:
    cdef Py_ssize_t max_head, max_headers, max_queued_requests, max_chunk_line
    cdef readonly bytes client
    cdef bytes fwd_head
    cdef ClientState cstate
    cdef ServiceState sstate
    cdef list events
    cdef bytes inbuf
    cdef readonly long long body_left
    cdef ChunkedEnd req_chunks
    cdef readonly Request cur, active
    cdef readonly object queue
    cdef readonly Py_ssize_t queued_bytes
    cdef bint upstream
    cdef list held
    cdef bytes resp_head
    cdef readonly long long resp_left
    cdef ChunkedEnd resp_chunked
    cdef readonly bint resp_started
    cdef bint resp_close, upstream_close
    cdef Py_ssize_t served

    cdef void _client_move(self, int what) except *
    cdef void _service_move(self, int what) except *
    cdef void _fail(self, int status, str text, str kind) except *
    cpdef list receive_client(self, bytes data)
    @cython.locals(n=Py_ssize_t, end=Py_ssize_t, state=int, pieces=list)
    cdef void _client_bytes(self, bytes data) except *
    cdef void _body(self, bytes piece) except *
    cdef void _body_end(self) except *
    cdef void _request(self, bytes head) except *
    cdef void _start(self, Request req) except *
    cpdef bytes request_bytes(self, bint fresh)
    cpdef bytes take_held(self)
    cpdef bytes take_body(self)
    @cython.locals(state=int)
    cpdef list receive_service(self, bytes data)
    @cython.locals(status=int, what=int, active=Request, plain=bint, end=Py_ssize_t)
    cdef void _response_head(self, bytes data) except *
    @cython.locals(n=Py_ssize_t, end=Py_ssize_t, left="long long", done=bint, state=int)
    cdef void _response_body(self, bytes data, bytes head) except *
    cdef void _response_done(self) except *
    cdef void _service_failed(self, int status, str text, str kind) except *
    @cython.locals(state=int)
    cpdef list service_closed(self, bint reset)
    @cython.locals(req=Request)
    cdef bint _retry(self) except -1
    @cython.locals(status=int, what=int, active=Request, chunked=bint)
    cdef tuple _client_head(self, bytes head)


@cython.locals(req=Request, sp=Py_ssize_t, colon=Py_ssize_t, http10=bint, special=object)
cdef Request _read_request(Framing fr, bytes head)
cdef bytes _origin_form(bytes url, bytes host, bytes method)
cdef bytes _clean_path(bytes path)
