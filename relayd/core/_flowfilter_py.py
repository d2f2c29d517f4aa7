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

``parse_packet`` reads the flow of an IP packet (TUN mode): protocol,
addresses and ports; for ICMP the type stands in the port and an echo's
identifier in the source port, so that ``ConnTrack`` needs nothing else.
``ConnTrack.answers`` tells whether a packet from the site answers a flow
it admitted (the reverse of that flow; an echo reply; an ICMP error that
quotes it).

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
#: ICMP types: echo request and reply (v4, v6); errors that quote a packet.
_ECHO4, _REPLY4, _ECHO6, _REPLY6 = 8, 0, 128, 129
_ERRORS4 = (3, 11, 12)
_ERRORS6 = (1, 2, 3, 4)


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

    def tracked(self, rules: RuleSet, flow: tuple) -> cython.bint:
        """Whether ``flow`` (a ``parse_packet`` tuple) is admitted under
        ``rules`` (this generation)."""
        hit = self.flows.get(flow)
        return hit is not None and hit[0] == rules.generation

    def answers(self, rules: RuleSet, pkt) -> cython.bint:
        """Whether ``pkt``, from the site, answers a flow admitted under
        ``rules``: the reverse of the flow, an echo reply to an admitted
        echo request, or an ICMP error quoting an admitted packet."""
        flow = parse_packet(pkt)
        if flow is None:
            return False
        proto: cython.int = flow[0]
        bits: cython.int = flow[1]
        typ: cython.int = flow[5]
        if proto == ICMP or proto == ICMPV6:
            if (proto == ICMP and typ == _REPLY4) or (proto == ICMPV6 and typ == _REPLY6):
                return self.tracked(rules, (proto, bits, flow[4], flow[3], flow[2],
                                            _ECHO4 if proto == ICMP else _ECHO6))
            if (proto == ICMP and bits == 32 and typ in _ERRORS4) or (proto == ICMPV6 and bits == 128 and typ in _ERRORS6):
                inner = parse_packet(pkt[(pkt[0] & 15) * 4 + 8 if bits == 32 else 48:], True)
                return inner is not None and inner[2] == flow[4] and self.tracked(rules, inner)
            return False
        return self.tracked(rules, (proto, bits, flow[4], flow[5], flow[2], flow[3]))


def parse_packet(pkt, quoted: cython.bint = False):
    """The flow of an IPv4 or IPv6 packet: ``(proto, bits, src, sport, dst,
    dport)``, addresses as ints; ICMP: ``sport`` an echo's identifier (else
    0), ``dport`` the type. None for what is not a whole first fragment of
    a well-formed packet (``quoted``: the start of a packet an ICMP error
    quotes, which may be cut short). A protocol the filter has no rules for
    comes back with ports 0 (and is denied)."""
    n: cython.Py_ssize_t = len(pkt)
    if n < 1:
        return None
    version: cython.int = pkt[0] >> 4
    hl: cython.Py_ssize_t
    proto: cython.int
    bits: cython.int
    if version == 4:
        hl = (pkt[0] & 15) * 4
        if hl < 20 or n < hl:
            return None
        if not quoted:
            total: cython.Py_ssize_t = (pkt[2] << 8) | pkt[3]
            if total < hl or total > n:
                return None
            n = total
        if ((pkt[6] & 0x1F) << 8) | pkt[7]:
            return None  # a later fragment: no ports to check
        proto = pkt[9]
        bits = 32
        src = int.from_bytes(pkt[12:16], "big")
        dst = int.from_bytes(pkt[16:20], "big")
    elif version == 6:
        hl = 40
        if n < 40:
            return None
        if not quoted:
            total6: cython.Py_ssize_t = 40 + ((pkt[4] << 8) | pkt[5])
            if total6 > n:
                return None
            n = total6
        proto = pkt[6]
        bits = 128
        src = int.from_bytes(pkt[8:24], "big")
        dst = int.from_bytes(pkt[24:40], "big")
    else:
        return None
    if proto == TCP or proto == UDP:
        if n < hl + 4:
            return None
        return (proto, bits, src, (pkt[hl] << 8) | pkt[hl + 1], dst, (pkt[hl + 2] << 8) | pkt[hl + 3])
    if proto == ICMP or proto == ICMPV6:
        if n < hl + 8 and not quoted or n < hl + 1:
            return None
        typ: cython.int = pkt[hl]
        ident: cython.int = 0
        if typ == _ECHO4 or typ == _REPLY4 or typ == _ECHO6 or typ == _REPLY6:
            if n < hl + 8:
                return None
            ident = (pkt[hl + 4] << 8) | pkt[hl + 5]
        return (proto, bits, src, ident, dst, typ)
    return (proto, bits, src, 0, dst, 0)
