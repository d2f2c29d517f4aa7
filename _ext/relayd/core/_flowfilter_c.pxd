# Cython contract of relayd/core/_flowfilter_py.py, compiled as
# relayd.core._flowfilter_c (see _yamux_c.pxd for how the one-source build
# works). The verdicts are C ints here and Python ints in the pure twin
# (the same values; relayd/core/flowfilter.py exports the pure module's).

import cython

cdef int DENY, ALLOW, BLOCK, PENDING
cdef int _ECHO4, _REPLY4, _ECHO6, _REPLY6
cdef tuple _ERRORS4, _ERRORS6
cdef tuple _TIE

@cython.final
cdef class Rule:
    cdef readonly int proto, bits, prefix, lo, hi, verdict
    cdef readonly object network
    cdef readonly str ref

@cython.final
cdef class _Table:
    cdef int bits
    cdef list lengths, by_length

    @cython.locals(bits=int, i=Py_ssize_t, n=Py_ssize_t, plen=int, ranges=list, r=tuple)
    cpdef object lookup(self, object addr, int port)

@cython.final
cdef class RuleSet:
    cdef readonly long long generation
    cdef readonly Py_ssize_t count
    cdef dict tables

    @cython.locals(t=_Table, r=tuple)
    cpdef tuple match(self, int proto, int bits, object addr, int port)

cdef tuple _precedence(tuple r)

@cython.final
cdef class ConnTrack:
    cdef dict flows
    cdef readonly Py_ssize_t max_flows
    cdef readonly long long lookups

    @cython.locals(key=tuple, hit=tuple, verdict=int)
    cpdef tuple check(self, RuleSet rules, int proto, int bits, object src, int sport, object dst, int dport)
    cpdef list recheck(self, RuleSet rules)
    cpdef forget(self, int proto, int bits, object src, int sport, object dst, int dport)
    cpdef bint tracked(self, RuleSet rules, tuple flow)
    @cython.locals(flow=tuple, inner=tuple)
    cpdef bint answers(self, RuleSet rules, bytes pkt)

cpdef object parse_packet(bytes pkt, bint quoted=*)
