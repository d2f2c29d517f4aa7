"""The agent's share of zero-trust TUN mode: the site end of users'
packet streams (relayd.gateway.ztpackets is the gateway's).

One TUN device (``agent.site_tun``) carries them all, made on the first
packet stream. Each stream belongs to one client address (its header's
``dest``): while the stream lives, a /32 route sends that address's
packets to the device, and the packets read there go to its stream. A
packet from a stream goes into the site only when its source is the
stream's address and its destination lies in the site's networks: the
second line behind the gateway's filter, as for dialled flows.

The kernel of the agent's host then delivers the packets (a service on
this host) or forwards them (another host of the site: that needs IP
forwarding on, and a route back to the tunnel addresses through this host,
or masquerading: see docs/zero-trust.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from relayd.core import flowfilter as ff
from relayd.errors import RelaydError
from relayd.log import RateLimitedLog
from relayd.net.packets import PacketLink, TunDevice

log = logging.getLogger("relayd.agent.tun")
_LOG = RateLimitedLog(log)


class SiteTun:
    def __init__(self, device: str, networks) -> None:
        self.device = device
        self.nets = [(int(n.network_address), int(n.netmask)) for n in networks if n.version == 4]
        self.dev: TunDevice | None = None
        self.links: dict[int, PacketLink] = {}
        self.dropped = 0

    def _open(self) -> TunDevice:
        if self.dev is None:
            dev = TunDevice(self.device)
            try:
                dev.configure(None, 65535)
            except RelaydError:
                dev.close()
                raise
            asyncio.get_running_loop().add_reader(dev.fd, self._read)
            self.dev = dev
            log.info("site TUN device up", extra={"device": dev.name})
        return self.dev

    async def serve(self, stream, dest: str) -> None:
        """One client's packets, until its stream ends."""
        try:
            addr = ipaddress.IPv4Address(dest)
        except ValueError:
            _LOG.warning("packet stream for a bad tunnel address refused")
            stream.reset()
            return
        try:
            dev = self._open()
            dev.route(f"{addr}/32")
        except RelaydError as exc:
            _LOG.warning("TUN mode unavailable on this agent: %s", exc)
            stream.reset()
            return
        key = int(addr)
        old = self.links.get(key)
        if old is not None:
            old.close()
        link = self.links[key] = PacketLink(stream, lambda pkt: self._into_site(key, pkt), "site")
        try:
            await link.run()
        finally:
            if self.links.get(key) is link:
                del self.links[key]
                try:
                    dev.route(f"{addr}/32", add=False)
                except RelaydError:
                    pass

    def _into_site(self, src: int, pkt: bytes) -> None:
        flow = ff.parse_packet(pkt)
        if flow is None or flow[1] != 32 or flow[2] != src \
                or not any(flow[4] & mask == net for net, mask in self.nets):
            self.dropped += 1
            _LOG.warning("packet outside this agent's site networks dropped")
            return
        self.dev.write(pkt)

    def _read(self) -> None:
        for pkt in self.dev.read_batch():
            if len(pkt) >= 20 and pkt[0] >> 4 == 4:
                link = self.links.get(int.from_bytes(pkt[16:20], "big"))
                if link is not None:
                    link.send(pkt)
                    continue
            self.dropped += 1

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        if self.dev is not None:
            self.dev.close()
            self.dev = None
