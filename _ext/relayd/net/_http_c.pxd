# Cython contract of relayd/net/_http_py.py, compiled as relayd.net._http_c
# (see ../core/_yamux_c.pxd for how the one-source build works).
#
# The HTTP ingress runs Python code for every request; as extension types
# with C fields its attribute reads and writes are struct accesses instead of
# dictionary lookups. Compiled as plain Python (no contract) it was slower
# than CPython's own specialising interpreter: bench/RESULTS.md.

cimport cython

cdef class Request:
    cdef public object method, url, upstream_head, body, route, local_head
    cdef public list headers
    cdef public Py_ssize_t head_bytes, body_bytes
    cdef public bint chunked, upgrade, head_only, complete, retried, has_body, expect_continue, keep_alive
    cdef public bint last_upstream

cdef class ChunkedEnd:
    cdef public int state, digits
    cdef public long long left, line, max_line, max_trailers
    cdef public bint colon

    @cython.locals(i=Py_ssize_t, n=Py_ssize_t, take=Py_ssize_t, c=int, state=int)
    cpdef long long feed(self, bytes data) except? -3

cdef class HttpConnection:
    cdef public object port, transport, routes, open_stream, opening, parser, queue, stream, stream_endpoint
    cdef public double gateway_timeout, deadline
    cdef public Request cur, active
    cdef public ChunkedEnd resp_chunked
    cdef public object inbuf, resp_head, pending_body, held, deadline_kind, loop_time
    cdef public bint mid_message, head_alone, resp_started, resp_close, upstream_close, raw, raw_in, closed
    cdef public bint write_paused, reading_paused, served_heads
    cdef public long long body_left, served, resp_left, deferred, held_bytes, last_gen
    cdef public long long max_head, max_headers, max_queued_body, max_queued_requests, max_chunk_line
    cdef public double idle_timeout
    cdef public object client, client_b, fwd_head, last_host, last_path, last_route, last_clean, _sweep

cdef class _Drain:
    cdef public object stream
