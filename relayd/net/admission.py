"""Admission: what a connection may cost the node before it has proven
anything.

Theory of operation
-------------------
Anyone can reach the agents port and the HTTPS port, and open connections
faster than any timeout closes them. Until a connection has finished its TLS
handshake *and* its first request (an agent's preamble, an HTTPS request
head) it is *unauthenticated*, and it is bounded three ways:

* per node (``max_unauthenticated``) and per source address (an IPv4
  address, or an IPv6 /64: one host owns a whole /64) - checked at accept,
  when the peer's address is known and before any TLS state exists;
* a reserve of a quarter of the node cap on top is kept for sources that
  recently proved who they are (an agent's link, an enrollment): a flood
  from many addresses fills the node cap, yet agents that reconnect from
  where they were still get in;
* by file descriptors: with fewer than ``fd_headroom`` left under the
  process limit, new unauthenticated and public connections are refused, so
  agents that reconnect and streams already flowing never starve;
* by time: the handshake timeout here, the preamble and head timeouts in
  the protocols after it.

A refused connection is reset at once (RST) and counted; a failed handshake
is classified (not TLS at all, an unknown or expired client certificate, no
shared protocol, timeout, EOF) and counted. Every class has a metric
(``relayd_bad_input_total{where, kind}``) and a rate-limited log line; the
number of unauthenticated connections is a gauge.

That is why the TLS listeners accept sockets themselves instead of letting
``loop.create_server(ssl=...)`` do it: there the peer's address is unknown
when the protocol is made, and handshake failures vanish without a trace.
Accepting is non-blocking and batched; when the process runs out of file
descriptors, accepting pauses briefly (connections wait in the kernel's
backlog) and that is counted too, instead of libuv's silent close.

After a burst, glibc keeps the freed TLS buffers in its arenas; after every
burst of unauthenticated connections (and every few seconds while one goes
on), the node asks the allocator to give the memory back (``malloc_trim``),
so RSS returns to its baseline instead of ratcheting up wave after wave.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import errno
import gc
import ipaddress
import logging
import resource
import socket
import ssl
from typing import Callable

from relayd import metrics
from relayd.core import tlshello
from relayd.core.config import AdmissionConfig
from relayd.core.tlshello import ClientHello
from relayd.errors import ConfigError
from relayd.log import RateLimitedLog
from relayd.net import abort_with_reset

log = logging.getLogger("relayd.admission")
_LOG = RateLimitedLog(log)

#: Connections accepted per readiness callback before yielding to the loop.
ACCEPT_BATCH = 64
#: Seconds accepting pauses when the process is out of file descriptors.
ACCEPT_PAUSE = 0.1
#: Unauthenticated connections ended since the last trim that make a burst
#: worth giving memory back after.
TRIM_CHURN = 64
#: Seconds between two trims at least.
TRIM_INTERVAL = 5.0
#: Sources remembered as having proven an identity (for the reserve).
KNOWN_SOURCES = 4096

_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def source_of(address: str) -> str:
    """The unit a per-source cap counts: an IPv4 address or an IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address) + "/64"
    return str(ip)


class Ticket:
    """One admitted unauthenticated connection; ``release()`` once it has
    passed its first request or is gone, ``proven()`` once it has shown an
    identity (idempotent both)."""

    __slots__ = ("_admission", "_source")

    def __init__(self, admission: "Admission", source: str) -> None:
        self._admission = admission
        self._source = source

    def release(self) -> None:
        adm, self._admission = self._admission, None
        if adm is not None:
            adm._release(self._source)

    def proven(self) -> None:
        adm = self._admission
        if adm is not None:
            adm._known(self._source)
        self.release()


class Admission:
    """The node's account of unauthenticated connections and its descriptors."""

    def __init__(self, cfg: AdmissionConfig | None = None) -> None:
        self.cfg = cfg or AdmissionConfig()
        self.fd_limit = raise_fd_limit()
        # A small process limit takes a smaller headroom (never all of it).
        self.headroom = min(self.cfg.fd_headroom, self.fd_limit // 4)
        # A node cap above what the descriptors allow would only move the
        # failure to accept(); keep half of what is left for everyone else.
        self.node_cap = max(1, min(self.cfg.max_unauthenticated, (self.fd_limit - self.headroom) // 2))
        self.reserve = max(1, self.node_cap // 4)
        self.total = 0
        self.peak = 0
        self.churn = 0  # released since the last heap trim
        self.by_source: dict[str, int] = {}
        # Sources that recently proved an identity, oldest first (bounded).
        self.known: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._trim_handle: asyncio.TimerHandle | None = None
        self._last_trim = 0.0
        self._gauge = metrics.UNAUTHENTICATED

    def fd_room(self, fd: int) -> bool:
        """False when ``fd`` (a descriptor just opened: the kernel hands out
        the lowest free one) eats into the headroom."""
        return fd < self.fd_limit - self.headroom

    def admit(self, fd: int, address: str, listener: str) -> Ticket | None:
        """A ticket, or None: refused (counted and logged, the caller closes)."""
        if not self.fd_room(fd):
            self._refused(listener, "fd_headroom", address)
            return None
        source = source_of(address)
        if self.total >= self.node_cap and (source not in self.known or self.total >= self.node_cap + self.reserve):
            self._refused(listener, "node_cap", address)
            return None
        n = self.by_source.get(source, 0)
        if n >= self.cfg.max_unauthenticated_per_source:
            self._refused(listener, "source_cap", address)
            return None
        self.by_source[source] = n + 1
        self.total += 1
        if self.total > self.peak:
            self.peak = self.total
        self._gauge.inc()
        return Ticket(self, source)

    def _known(self, source: str) -> None:
        self.known[source] = None
        self.known.move_to_end(source)
        if len(self.known) > KNOWN_SOURCES:
            self.known.popitem(last=False)

    def _refused(self, listener: str, kind: str, address: str) -> None:
        metrics.BAD_INPUT.labels(listener, kind).inc()
        _LOG.warning("connection refused: %s", kind, extra={"listener": listener, "peer": address,
                                                             "unauthenticated": self.total})

    def _release(self, source: str) -> None:
        n = self.by_source.get(source, 0) - 1
        if n > 0:
            self.by_source[source] = n
        else:
            self.by_source.pop(source, None)
        self.total -= 1
        self.churn += 1
        self._gauge.dec()
        if self.churn >= TRIM_CHURN and self._trim_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            # Soon (the closed transports are freed first), and at most
            # every TRIM_INTERVAL: during a long flood too, since freed TLS
            # buffers fragment the heap and it grows even under the cap.
            delay = max(0.2, self._last_trim + TRIM_INTERVAL - loop.time())
            self._trim_handle = loop.call_later(delay, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self._last_trim = asyncio.get_running_loop().time()
        churn, self.churn = self.churn, 0
        peak, self.peak = self.peak, self.total
        gc.collect()
        if trim_heap():
            _LOG.info("memory returned to the system after a burst",
                      extra={"connections": churn, "peak_unauthenticated": peak})

    def close(self) -> None:
        if self._trim_handle is not None:
            self._trim_handle.cancel()
            self._trim_handle = None


_libc = None


def trim_heap() -> bool:
    """glibc's malloc_trim(0): give freed heap pages back to the system."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    fn = getattr(_libc, "malloc_trim", None) if _libc else None
    if fn is None:
        return False
    return bool(fn(0))


def bind(host: str, port: int, what: str, backlog: int = 1024, listen: bool = True) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (every address the name has),
    non-blocking. Errors become one clear ConfigError naming ``what``.
    ``listen=False`` leaves them bound only: the caller calls ``listen``
    once it is ready for the first connection."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: cannot listen on {where}: {exc.strerror}") from None
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, type_, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as exc:
                if port == 0 and len(socks) > 1:
                    # Port 0 on a name with several addresses: each socket
                    # would get a different port; the first is enough.
                    socks.pop().close()
                    continue
                raise ConfigError(f"{what}: cannot listen on {where}: {_why(exc)}") from None
            if listen:
                s.listen(backlog)
            s.setblocking(False)
            if port == 0:
                port = s.getsockname()[1]  # the other addresses take the same port
                break
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another relayd, or another program, listens there)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this host's"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def classify_handshake_error(exc: BaseException) -> str:
    """A short, bounded label for why a TLS handshake failed."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "tls_timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        msg = (getattr(exc, "verify_message", "") or "").lower()
        if "expired" in msg:
            return "client_cert_expired"
        if "not yet valid" in msg:
            return "client_cert_not_yet_valid"
        if "revoked" in msg:
            return "client_cert_revoked"
        return "client_cert_untrusted"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "BAD_PACKET_LENGTH",
                      "RECORD_LENGTH_MISMATCH", "WRONG_SSL_VERSION", "UNEXPECTED_MESSAGE",
                      "DECRYPTION_FAILED_OR_BAD_RECORD_MAC", "BAD_RECORD_TYPE"):
            return "not_tls"
        if reason in ("UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE",
                      "TLSV1_ALERT_PROTOCOL_VERSION"):
            return "tls_version"
        if reason in ("NO_SHARED_CIPHER", "NO_SUITABLE_SIGNATURE_ALGORITHM", "NO_SUITABLE_KEY_SHARE",
                      "SSLV3_ALERT_HANDSHAKE_FAILURE"):
            return "no_shared_cipher"
        if "ALERT" in reason and ("CA" in reason or "CERTIFICATE" in reason):
            return "peer_rejected_certificate"
        if reason in ("UNEXPECTED_EOF_WHILE_READING",) or isinstance(exc, ssl.SSLEOFError):
            return "eof_in_handshake"
        return "tls_error"
    if isinstance(exc, ConnectionAbortedError) and "handshake" in str(exc).lower():
        return "tls_timeout"  # uvloop's handshake timeout
    if isinstance(exc, (ConnectionError, EOFError)):
        return "eof_in_handshake"
    return "tls_error"


class TlsListener:
    """A TLS listener that admits before it handshakes.

    ``make_protocol(ticket)`` makes the protocol of an admitted connection;
    it releases the ticket once the connection has proven itself (or at
    ``connection_lost``).

    ``chooser`` (optional) picks by the ClientHello what OpenSSL cannot: while
    ``chooser.peeking`` is true, the first TLS record of each new connection
    is peeked at (not consumed) and ``chooser.choose(hello)`` (a
    relayd.core.tlshello.ClientHello) returns None (the usual context and
    protocol) or ``(context, make_protocol or None)``."""

    def __init__(self, admission: Admission, name: str, socks: list[socket.socket], ctx: ssl.SSLContext,
                 make_protocol: Callable[[Ticket], asyncio.Protocol], chooser=None) -> None:
        self.admission = admission
        self.name = name
        metrics.RESOURCE_EXHAUSTED.labels(name, "file_descriptors")  # at 0 until it happens: alerts have data
        self.socks = socks
        self.ctx = ctx
        self.make_protocol = make_protocol
        self.chooser = chooser
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task] = set()
        self._paused: asyncio.TimerHandle | None = None
        self._closed = False
        for s in socks:
            self._loop.add_reader(s.fileno(), self._accept, s)

    @property
    def port(self) -> int:
        return self.socks[0].getsockname()[1]

    @property
    def serving(self) -> bool:
        """Accepting now: not closed, not paused for want of file descriptors."""
        return not self._closed and self._paused is None

    def _accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:
                    self._out_of_fds(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self._admit(sock, addr)

    def _admit(self, sock: socket.socket, addr) -> None:
        address = addr[0] if isinstance(addr, tuple) else str(addr)
        ticket = self.admission.admit(sock.fileno(), address, self.name)
        if ticket is None:
            _reset(sock)
            return
        sock.setblocking(False)
        task = self._loop.create_task(self._handshake(sock, address, ticket))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, sock: socket.socket, address: str, ticket: Ticket) -> None:
        ctx, make, timeout = self.ctx, self.make_protocol, self.admission.cfg.handshake_timeout
        try:
            if self.chooser is not None and self.chooser.peeking:
                deadline = self._loop.time() + timeout
                try:
                    hello = await self._peek_hello(sock, deadline)
                except asyncio.CancelledError:
                    sock.close()  # no transport owns it yet
                    raise
                choice = self.chooser.choose(hello) if hello is not None else None
                if choice is not None:
                    ctx, make = choice[0], choice[1] or make
                timeout = max(0.1, deadline - self._loop.time())
            await self._loop.connect_accepted_socket(lambda: make(ticket), sock, ssl=ctx,
                                                     ssl_handshake_timeout=timeout)
        except asyncio.CancelledError:
            ticket.release()
            raise
        except Exception as exc:
            # The socket belongs to the loop's transport now, which closes it.
            ticket.release()
            kind = classify_handshake_error(exc)
            metrics.BAD_INPUT.labels(self.name, kind).inc()
            _LOG.info("TLS handshake failed: %s", kind, extra={"listener": self.name, "peer": address})

    async def _peek_hello(self, sock: socket.socket, deadline: float) -> ClientHello | None:
        """The ClientHello in the first record, left in the socket for the
        handshake; None when it does not come whole in time or is not one
        (the handshake then fails or times out as it always would)."""
        lowat = False
        try:
            while True:
                try:
                    data = sock.recv(tlshello.RECORD_HEADER + tlshello.MAX_RECORD, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    data = None
                if data == b"":
                    return None
                if data:
                    total = tlshello.record_length(data)
                    if total is not None and len(data) >= total:
                        return tlshello.parse_client_hello(data)
                    # Readable again only once the whole record is there
                    # (a peek leaves the bytes, so plain readiness would spin).
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, total or tlshello.RECORD_HEADER)
                    lowat = True
                left = deadline - self._loop.time()
                if left <= 0:
                    return None
                ready = self._loop.create_future()
                self._loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await asyncio.wait_for(ready, left)
                except asyncio.TimeoutError:
                    return None
                finally:
                    self._loop.remove_reader(sock.fileno())
        except (tlshello.HelloError, OSError):
            return None
        finally:
            if lowat:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass

    def _out_of_fds(self, exc: OSError) -> None:
        metrics.RESOURCE_EXHAUSTED.labels(self.name, "file_descriptors").inc()
        _LOG.error("out of file descriptors: pausing accept for %gs", ACCEPT_PAUSE,
                   extra={"listener": self.name, "errno": errno.errorcode.get(exc.errno, str(exc.errno))})
        for s in self.socks:
            self._loop.remove_reader(s.fileno())
        if self._paused is None:
            self._paused = self._loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if not self._closed:
            for s in self.socks:
                self._loop.add_reader(s.fileno(), self._accept, s)

    def close(self) -> None:
        """Stop accepting; handshakes in progress are cancelled."""
        if self._closed:
            return
        self._closed = True
        if self._paused is not None:
            self._paused.cancel()
        for s in self.socks:
            self._loop.remove_reader(s.fileno())
            s.close()
        for t in list(self._tasks):
            t.cancel()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def public_connection_ok(admission: Admission | None, transport, listener: str) -> bool:
    """For listeners without a handshake (public TCP endpoints): refuse with
    a reset when descriptors run short, so agents are never starved."""
    if admission is None:
        return True
    sock = transport.get_extra_info("socket")
    if sock is None or admission.fd_room(sock.fileno()):
        return True
    metrics.BAD_INPUT.labels(listener, "fd_headroom").inc()
    _LOG.warning("connection refused: fd_headroom", extra={"listener": listener})
    abort_with_reset(transport)
    return False
