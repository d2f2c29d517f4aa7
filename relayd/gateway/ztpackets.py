"""TUN mode at the zero-trust gateway: a user session's IP packets, each
checked by the session's packet filter (``../shared/specs/zero-trust.md``
section 6; issue 12, item 4).

The client asks for it on a flow stream with ``{"proto": "ip"}``. The
gateway gives the session an address of its pool (``tun_pool``), opens a
``packets`` stream to an agent of the site (the header's ``dest`` is that
address) and answers ``{"r": "ok", "address", "mtu"}``; from then on both
streams carry framed IP packets (relayd.net.packets).

From the client, a packet passes when its source is the session's address
and the session's connection tracking admits its flow: one dict lookup for
an established flow, a full rule match for a new one (loopback, link-local
and metadata addresses only by a rule that names them, as for flows). A
new flow denied or blocked is answered with ICMP "administratively
prohibited" (so a program fails at once instead of timing out) and
audited; a flow waiting on a condition sends the interaction, as a flow
does, and its packets are dropped until the step-up (TCP's retransmission
then gets through). From the site, a packet passes only when it answers an
admitted flow (``ConnTrack.answers``). A recompile matches the tracked flows
again; those no longer allowed are forgotten, audited as cut, and their
packets dropped from then on.

Counters are kept per session and added to ``relayd_zt_packets_total``
once per read of a stream (not one metric call per packet).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time

from relayd import metrics
from relayd.core import flowfilter as ff
from relayd.core.framing import encode_message
from relayd.core.wire import KIND_PACKETS
from relayd.net.packets import PacketLink

#: A flow's denial is audited (and answered with ICMP) at most this often.
_DENY_EVERY = 5.0
#: ICMP answers a session sends per second at most.
_ICMP_PER_SECOND = 50
_PROTO_NAMES = {ff.TCP: "tcp", ff.UDP: "udp", ff.ICMP: "icmp", ff.ICMPV6: "icmpv6"}


def _reply(msg: dict) -> bytes:
    return encode_message(msg)


def proto_name(proto: int) -> str:
    return _PROTO_NAMES.get(proto, str(proto))


class AddressPool:
    """The tunnel addresses of one gateway: one per live TUN session."""

    def __init__(self, network: str) -> None:
        self.net = ipaddress.ip_network(network)
        self.used: set[int] = set()
        self._next = 2

    def take(self) -> int | None:
        size = self.net.num_addresses - 2
        for _ in range(size):
            n = self._next
            self._next = 2 if self._next >= size else self._next + 1
            addr = int(self.net.network_address) + n
            if addr not in self.used:
                self.used.add(addr)
                return addr
        return None

    def give_back(self, addr: int) -> None:
        self.used.discard(addr)


class TunPath:
    """One session's packets between its client and the site."""

    def __init__(self, sess, address: int) -> None:
        self.sess = sess
        self.address = address
        self.ct = ff.ConnTrack()
        self.client: PacketLink | None = None
        self.site: PacketLink | None = None
        self.counts: dict[tuple[str, str], int] = {}
        self.denied: dict[tuple, float] = {}
        self._icmp_second = 0
        self._icmp_sent = 0

    # -- life ---------------------------------------------------------------------

    async def run(self, client_st, mtu: int) -> None:
        sess = self.sess
        fut = sess.loop.create_future()

        def ready(stream, reason):
            if not fut.done():
                fut.set_result((stream, reason))

        addr = str(ipaddress.IPv4Address(self.address))
        opening = sess.gw.seam.open(f"site:{sess.gw.site}", sess.peer, ready, kind=KIND_PACKETS,
                                    identity=sess.claims["sub"], dest=addr)
        try:
            site_st, reason = await fut
        except asyncio.CancelledError:
            if opening is not None:
                opening.cancel()
            raise
        if site_st is None or sess.closed:
            if site_st is not None:
                site_st.reset()
            client_st.send_nowait(_reply({"r": "unreachable", "why": reason or "closed"}))
            client_st.write_eof()
            return
        client_st.send_nowait(_reply({"r": "ok", "address": addr, "mtu": mtu}))
        self.client = PacketLink(client_st, self.from_client, "zt-client", self.flush)
        self.site = PacketLink(site_st, self.from_site, "zt-site", self.flush)
        tasks = [asyncio.ensure_future(self.client.run()), asyncio.ensure_future(self.site.run())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            client_st.reset()
            site_st.reset()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.flush()

    def close(self) -> None:
        for link in (self.client, self.site):
            if link is not None:
                link.close()

    def _count(self, direction: str, result: str) -> None:
        k = (direction, result)
        self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> None:
        if self.counts:
            site = self.sess.gw.site or "-"
            for (direction, result), n in self.counts.items():
                metrics.ZT_PACKETS.labels(site, direction, result).inc(n)
            self.counts.clear()

    # -- packets --------------------------------------------------------------------

    def from_client(self, pkt: bytes) -> None:
        flow = ff.parse_packet(pkt)
        if flow is None:
            self._count("out", "malformed")
            return
        if flow[1] != 32 or flow[2] != self.address:
            self._count("out", "spoofed")  # not from the session's address (or IPv6: none given)
            return
        sess = self.sess
        rules = sess.rules
        before = self.ct.lookups
        verdict, ref = self.ct.check(rules, *flow)
        if self.ct.lookups != before:  # a new flow (or a new rule set): decided in full
            if verdict == ff.ALLOW and not sess.allowed_address(flow[4], ref):
                self.ct.forget(*flow)
                verdict, ref = ff.DENY, ""
            if verdict == ff.PENDING:
                sess._recompile()  # conditions judged again at access
                verdict, ref = self.ct.check(sess.rules, *flow)
            self._decided(pkt, flow, verdict, ref)
        if verdict == ff.ALLOW:
            if self.site.send(pkt):
                self._count("out", "passed")
            else:
                self._count("out", "queue_full")
        else:
            self._count("out", ff.VERDICTS[verdict])

    def from_site(self, pkt: bytes) -> None:
        if self.ct.answers(self.sess.rules, pkt):
            if self.client.send(pkt):
                self._count("in", "passed")
            else:
                self._count("in", "queue_full")
        else:
            self._count("in", "not_established")

    def _decided(self, pkt: bytes, flow: tuple, verdict: int, ref: str) -> None:
        sess = self.sess
        dst = str(ipaddress.ip_address(flow[4]))
        proto = proto_name(flow[0])
        if verdict == ff.ALLOW:
            sess._audit("allow", ref, dst, flow[5], None, proto=proto)
            return
        now = time.monotonic()
        key = flow[:1] + flow[4:]
        if self.denied.get(key, 0.0) > now:
            return
        if len(self.denied) >= 1024:
            self.denied = {k: t for k, t in self.denied.items() if t > now}
            if len(self.denied) >= 1024:
                return
        self.denied[key] = now + _DENY_EVERY
        if verdict == ff.PENDING:
            eid = ref.partition("#")[0]
            inter = sess._interaction(eid)
            sess._audit("pending", ref, dst, flow[5], None, why=",".join(sess.states[eid].failing),
                        interaction=inter["id"] if inter else None, proto=proto)
            return
        sess._audit(ff.VERDICTS[verdict], ref, dst, flow[5], None, proto=proto)
        self._prohibited(pkt, flow)

    def _prohibited(self, pkt: bytes, flow: tuple) -> None:
        """ICMP destination unreachable, administratively prohibited, to the
        client (never in answer to an ICMP error; a few per second)."""
        if flow[0] == ff.ICMP and flow[5] not in (8, 13, 15, 17):
            return
        second = int(time.monotonic())
        if second != self._icmp_second:
            self._icmp_second, self._icmp_sent = second, 0
        if self._icmp_sent >= _ICMP_PER_SECOND:
            return
        self._icmp_sent += 1
        self.client.send(icmp_prohibited(pkt))

    def recheck(self) -> list:
        """After a recompile: the tracked flows matched again; those no
        longer allowed are forgotten and returned as (proto, dst, port)."""
        return [(k[0], k[4], k[5]) for k in self.ct.recheck(self.sess.rules)]


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def icmp_prohibited(pkt: bytes) -> bytes:
    """ICMPv4 type 3 code 13 about ``pkt`` (an IPv4 packet), from its
    destination to its source, quoting its header and first 8 bytes."""
    hl = (pkt[0] & 15) * 4
    body = bytearray(b"\x03\x0d\0\0\0\0\0\0" + pkt[:hl + 8])
    body[2:4] = _checksum(bytes(body)).to_bytes(2, "big")
    total = 20 + len(body)
    head = bytearray(b"\x45\0" + total.to_bytes(2, "big") + b"\0\0\0\0\x40\x01\0\0" + pkt[16:20] + pkt[12:16])
    head[10:12] = _checksum(bytes(head)).to_bytes(2, "big")
    return bytes(head + body)
