"""The per-user flow filter of the zero-trust gateway (issue 12), sans-I/O:
a compiled rule matcher and connection tracking. One source for both builds
(``_flowfilter_c`` with ``_ext/relayd/core/_flowfilter_c.pxd``; the pure twin
as it is); ``../shared/specs/zero-trust.md`` section 6 is the reference.

A rule is ``protocol x destination prefix (IPv4 or IPv6) x range (ports, or
ICMP types) x verdict (allow, block, pending) x ref``. ``RuleSet`` compiles a
session's rules into, per protocol and address family, the prefix lengths
present, longest first, each a dict ``masked address -> ranges`` with the
ranges sorted by precedence. A lookup walks the lengths and the first
length with a range that holds the port decides:

* precedence: the longer prefix, then the smaller range, then the higher
  range start; an exact tie: block over allow over pending;
* no rule matches: deny (``DENY``).

``ConnTrack`` remembers each admitted flow (protocol, source, source port,
destination, destination port) with the rule set's generation, so that an
established flow costs one dict lookup per packet; a new rule set (a
recompile) makes every flow be matched again (``recheck``), and those no
longer allowed are returned to be reset.
"""

from __future__ import annotations

import cython

#: Verdicts.
DENY = 0  # no rule matched
ALLOW = 1
BLOCK = 2
PENDING = 3  # allowed once a condition is met (step-up)
VERDICTS = ("deny", "allow", "block", "pending")
# Tie-break at equal prefix and range: block, then allow, then pending.
_TIE = (3, 1, 0, 2)

#: Protocol numbers the filter knows.
TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58


class Rule:
    """One compiled rule. ``network`` is the destination prefix's address
    as an int (``bits`` 32 or 128), ``prefix`` its length; ``lo``..``hi``
    the port (or ICMP type) range, inclusive."""

    def __init__(self, proto: int, bits: int, network: int, prefix: int, lo: int, hi: int, verdict: int,
                 ref: str = "") -> None:
        if bits not in (32, 128) or not 0 <= prefix <= bits or not 0 <= lo <= hi <= 65535 \
                or verdict not in (ALLOW, BLOCK, PENDING) or not 0 <= proto <= 255:
            raise ValueError("rule out of range")
        self.proto = proto
        self.bits = bits
        self.prefix = prefix
        self.network = (network >> (bits - prefix)) << (bits - prefix) if prefix else 0
        self.lo = lo
        self.hi = hi
        self.verdict = verdict
        self.ref = ref

    def __repr__(self) -> str:
        return (f"Rule({self.proto}, v{4 if self.bits == 32 else 6} {self.network:x}/{self.prefix}, "
                f"{self.lo}-{self.hi}, {VERDICTS[self.verdict]}, {self.ref!r})")


class _Table:
    """The rules of one protocol and address family."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.lengths = []  # prefix lengths present, longest first
        self.by_length = []  # for each: {masked address: [(lo, hi, verdict, ref), ...] by precedence}

    def lookup(self, addr, port: cython.int):
        bits: cython.int = self.bits
        i: cython.Py_ssize_t
        n: cython.Py_ssize_t = len(self.lengths)
        plen: cython.int
        for i in range(n):
            plen = self.lengths[i]
            ranges = self.by_length[i].get(addr >> (bits - plen) if plen else 0)
            if ranges is not None:
                for r in ranges:
                    if r[0] <= port <= r[1]:
                        return r
        return None


class RuleSet:
    """A session's rules, compiled; immutable once made (a recompile makes
    a new one, swapped in one step). ``generation`` tells ConnTrack it is
    new."""

    def __init__(self, rules, generation: int = 0) -> None:
        self.generation = generation
        self.count = 0
        tables: dict = {}
        groups: dict = {}
        for rule in rules:
            key = (rule.proto, rule.bits)
            groups.setdefault(key, {}).setdefault(rule.prefix, {}).setdefault(
                rule.network >> (rule.bits - rule.prefix) if rule.prefix else 0, []).append(
                (rule.lo, rule.hi, rule.verdict, rule.ref))
            self.count += 1
        for key, by_len in groups.items():
            t = _Table(key[1])
            for plen in sorted(by_len, reverse=True):
                cells = by_len[plen]
                for k in cells:
                    cells[k].sort(key=_precedence)
                t.lengths.append(plen)
                t.by_length.append(cells)
            tables[key] = t
        self.tables = tables

    def match(self, proto: cython.int, bits: cython.int, addr, port: cython.int) -> tuple:
        """(verdict, ref) of the packet or flow to ``addr``:``port``
        (``bits`` 32: IPv4, 128: IPv6); (DENY, "") when no rule matches."""
        t = self.tables.get((proto, bits))
        if t is None:
            return DENY, ""
        r = t.lookup(addr, port)
        if r is None:
            return DENY, ""
        return r[2], r[3]


def _precedence(r: tuple) -> tuple:
    return (r[1] - r[0], -r[0], _TIE[r[2]])


class ConnTrack:
    """Flows a session's rule set admitted. ``check`` answers a packet of a
    flow: the remembered verdict while the rule set is the one that admitted
    it, else a new match (remembered when allowed). At most ``max_flows``
    are remembered (the oldest go first)."""

    def __init__(self, max_flows: int = 65536) -> None:
        self.flows = {}
        self.max_flows = max_flows
        self.lookups = 0  # full rule matches made (the rest were one dict lookup)

    def check(self, rules: RuleSet, proto: cython.int, bits: cython.int, src, sport: cython.int, dst,
              dport: cython.int) -> tuple:
        key = (proto, bits, src, sport, dst, dport)
        hit = self.flows.get(key)
        if hit is not None and hit[0] == rules.generation:
            return hit[1], hit[2]
        self.lookups += 1
        verdict, ref = rules.match(proto, bits, dst, dport)
        if verdict == ALLOW:
            if hit is None and len(self.flows) >= self.max_flows:
                del self.flows[next(iter(self.flows))]
            self.flows[key] = (rules.generation, verdict, ref)
        elif hit is not None:
            del self.flows[key]
        return verdict, ref

    def recheck(self, rules: RuleSet) -> list:
        """Match every remembered flow against ``rules`` (a recompile): the
        keys of those no longer allowed (to reset and audit
        ``revoked_by_reeval``) are forgotten and returned."""
        gone = []
        for key in list(self.flows):
            verdict, ref = rules.match(key[0], key[1], key[4], key[5])
            if verdict == ALLOW:
                self.flows[key] = (rules.generation, verdict, ref)
            else:
                del self.flows[key]
                gone.append(key)
        return gone

    def forget(self, proto: cython.int, bits: cython.int, src, sport: cython.int, dst, dport: cython.int) -> None:
        self.flows.pop((proto, bits, src, sport, dst, dport), None)
