"""IP packets between a TUN device and a mux stream (zero-trust TUN mode).

Three parties carry packets: the client (its TUN device, where programs
send), the gateway (the per-user packet filter, between the client's
stream and the agent's) and the agent (a TUN device in the site, where the
kernel delivers and routes). Each hop is a ``PacketLink``: the packets of one
stream, framed as relayd.core.framing says, read into a callback and written
from a bounded queue. A packet that finds the queue full is dropped, as a
router drops: TCP inside the tunnel backs off, and no party buffers without
bound.

``TunDevice`` opens a Linux TUN device (no packet information header) and
sets its address, MTU and routes with iproute2's ``ip``: it needs
CAP_NET_ADMIN (root, or the capability given to the program). Closing the
descriptor removes the device and its routes.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import struct
import subprocess

from relayd.core.framing import FramingError, PacketSplitter, frame_packet
from relayd.errors import ConfigError, RelaydError
from relayd.log import caught

log = logging.getLogger("relayd.packets")

#: Bytes a link queues toward its stream before it drops packets.
QUEUE_LIMIT = 512 * 1024
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
#: Packets read from a TUN device in one wake-up.
_BATCH = 64


class TunDevice:
    """A TUN device of this process: ``read_batch`` and ``write`` of whole
    IP packets, without blocking."""

    def __init__(self, name: str = "relayd%d") -> None:
        if len(name.encode()) > 15:
            raise ConfigError(f"TUN device name {name!r} is longer than 15 bytes")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"TUN mode: cannot open /dev/net/tun ({exc.strerror})") from None
        try:
            ifr = fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"TUN mode: cannot create a TUN device ({exc.strerror}; it needs CAP_NET_ADMIN)") from None
        self.fd = fd
        self.name = ifr[:16].rstrip(b"\0").decode()
        self.dropped = 0

    def configure(self, address: str | None, mtu: int, routes=()) -> None:
        """Bring the device up with ``address`` (a /32 or /128 of this end,
        or none), ``mtu`` and a route to each of ``routes`` through it."""
        try:  # IPv4 only: no router solicitations or MLD reports into the tunnel
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:
            pass
        _ip("link", "set", "dev", self.name, "mtu", str(mtu), "up")
        if address:
            _ip("addr", "add", address, "dev", self.name)
        for net in routes:
            self.route(str(net))

    def route(self, net: str, add: bool = True) -> None:
        n = ipaddress.ip_network(net, strict=False)
        _ip(*(("-6",) if n.version == 6 else ()), "route", "replace" if add else "del", str(n), "dev", self.name)

    def read_batch(self) -> list[bytes]:
        out = []
        for _ in range(_BATCH):
            try:
                out.append(os.read(self.fd, 65535))
            except BlockingIOError:
                break
        return out

    def write(self, pkt: bytes) -> None:
        try:
            os.write(self.fd, pkt)
        except (BlockingIOError, OSError):
            # A full queue, or a packet the kernel refuses: dropped.
            self.dropped += 1

    def close(self) -> None:
        if self.fd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1


def _ip(*args: str) -> None:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"TUN mode needs iproute2's `ip` ({exc})") from None
    if res.returncode != 0:
        raise RelaydError(f"ip {' '.join(args)}: {res.stderr.strip()[:200]}")


class PacketLink:
    """The packets of one stream: ``on_packet(bytes)`` for each arriving
    packet, then ``after_read()`` (if given) once per read of the stream;
    ``send(bytes)`` queues one (False when dropped: queue full or link
    closed). ``run()`` pumps until the stream ends."""

    def __init__(self, stream, on_packet, name: str = "packets", after_read=None) -> None:
        self.stream = stream
        self.on_packet = on_packet
        self.after_read = after_read
        self.name = name
        self._out: list[bytes] = []
        self._queued = 0
        self._wake = asyncio.Event()
        self.closed = False
        self.dropped = 0
        self.sent = self.received = 0

    def send(self, pkt: bytes) -> bool:
        if self.closed or self._queued + len(pkt) > QUEUE_LIMIT or not 0 < len(pkt) <= 0xFFFF:
            self.dropped += 1
            return False
        self._out.append(frame_packet(pkt))
        self._queued += len(pkt) + 2
        self.sent += 1
        self._wake.set()
        return True

    async def run(self) -> None:
        writer = asyncio.ensure_future(self._write_loop())
        splitter = PacketSplitter()
        try:
            while True:
                data = await self.stream.read(256 * 1024)
                if not data:
                    break
                for pkt in splitter.feed(data):
                    self.received += 1
                    try:
                        self.on_packet(pkt)
                    except Exception as exc:  # a bug: that packet is lost, the link goes on
                        caught("packet_link", exc, link=self.name)
                if self.after_read is not None:
                    self.after_read()
        except FramingError:
            log.info("malformed packet stream closed", extra={"link": self.name})
            self.stream.reset()
        except (RelaydError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed = True
            writer.cancel()
            try:
                await writer
            except (asyncio.CancelledError, RelaydError, ConnectionError):
                pass

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._out:
                chunk, self._out = b"".join(self._out), []
                self._queued = 0
                await self.stream.write(chunk)

    def close(self) -> None:
        self.closed = True
        self.stream.reset()
