"""A TLS ClientHello's server name and ALPN list, read before the handshake.

Theory of operation
-------------------
OpenSSL (through Python's ``ssl``) lets the HTTPS port pick a certificate
by SNI, but not by the application protocols the client offers: the ALPN
list is not visible when the certificate is chosen. Two things need it:

* TLS-ALPN-01 (RFC 8737): the ACME server connects with ALPN ``acme-tls/1``
  and must get a self-signed challenge certificate for the name; everybody
  else asking for that name must keep getting the real one;
* relayd's own clients (agents over WSS, zero-trust clients) verify the
  HTTPS port against the relay's CA; they offer ALPN ``relayd`` so that they
  get the relay's own certificate even where a public one (ACME, a file)
  serves the same name to browsers.

So, while one of those is in play, the listener peeks at the first TLS
record of a new connection (without consuming it) and this module reads
the ClientHello in it. Only what is needed is extracted; everything else is
checked for length consistency and skipped. The bytes come from anyone:
every length is checked against what is there, and anything that is not a
well-formed ClientHello in one record is a ``HelloError`` (the listener
then lets the TLS library refuse the connection as it always does).

Sans-I/O: bytes in, a value or ``HelloError`` out (RFC 8446 4.1.2 and
4.2, RFC 6066 3, RFC 7301 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.errors import ProtocolError

#: A TLS record carries at most 2^14 bytes of plaintext (RFC 8446 5.1).
MAX_RECORD = 1 << 14
RECORD_HEADER = 5
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16


class HelloError(ProtocolError):
    """Not a ClientHello that fits in the first record, or a malformed one."""


@dataclass(frozen=True)
class ClientHello:
    """What the certificate choice needs: the host name the client asked
    for (lower case, None without SNI) and the protocols it offers."""

    server_name: str | None
    alpn: tuple[bytes, ...] = ()


def record_length(data: bytes) -> int | None:
    """Bytes of the first TLS record (header included) once its header is
    there, else None; HelloError if it is not a handshake record."""
    if len(data) < RECORD_HEADER:
        if data and data[0] != _HANDSHAKE:
            raise HelloError("not a TLS handshake record")
        return None
    if data[0] != _HANDSHAKE or data[1] != 3:
        raise HelloError("not a TLS handshake record")
    n = int.from_bytes(data[3:5], "big")
    if not 0 < n <= MAX_RECORD:
        raise HelloError("bad record length")
    return RECORD_HEADER + n


class _Reader:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> memoryview:
        if n > self.end - self.pos:
            raise HelloError(f"{what} runs past its end")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, size_bytes: int, what: str) -> "_Reader":
        n = self.int(size_bytes, what)
        self.take(n, what)
        return _Reader(self.buf, self.pos - n, self.pos)

    def remaining(self) -> int:
        return self.end - self.pos

    def take_rest(self) -> memoryview:
        return self.take(self.end - self.pos, "")

    def done(self) -> bool:
        return self.pos == self.end


def parse_client_hello(data: bytes) -> ClientHello:
    """The ClientHello in the first record of ``data`` (which must hold that
    whole record; bytes after it are ignored)."""
    total = record_length(data)
    if total is None or len(data) < total:
        raise HelloError("the first record is not whole")
    rec = _Reader(memoryview(data), RECORD_HEADER, total)
    if rec.int(1, "handshake type") != _CLIENT_HELLO:
        raise HelloError("not a ClientHello")
    n = rec.int(3, "handshake length")
    if n > rec.end - rec.pos:
        raise HelloError("ClientHello spans several records")
    body = _Reader(rec.buf, rec.pos, rec.pos + n)
    body.take(2 + 32, "version and random")
    if body.vector(1, "session id").remaining() > 32:
        raise HelloError("session id longer than 32 bytes")
    suites = body.vector(2, "cipher suites").remaining()
    if suites < 2 or suites % 2:
        raise HelloError("cipher suites")
    if body.vector(1, "compression methods").remaining() < 1:
        raise HelloError("no compression method")
    if body.done():
        return ClientHello(None)  # no extensions at all (TLS 1.2 allows it)
    exts = body.vector(2, "extensions")
    if not body.done():
        raise HelloError("bytes after the extensions")
    seen: set[int] = set()
    name: str | None = None
    alpn: tuple[bytes, ...] = ()
    while not exts.done():
        kind = exts.int(2, "extension type")
        ext = exts.vector(2, "extension")
        if kind in seen:
            raise HelloError("an extension given twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            name = _server_name(ext)
        elif kind == _EXT_ALPN:
            alpn = _alpn(ext)
    return ClientHello(name, alpn)


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server name list")
    if not ext.done() or names.done():
        raise HelloError("server name extension")
    found = None
    while not names.done():
        kind = names.int(1, "server name type")
        value = bytes(names.vector(2, "server name").take_rest())
        if kind == 0:
            if found is not None:
                raise HelloError("two host names")  # RFC 6066 3: at most one of a type
            if not value or any(c <= 32 or c >= 127 for c in value):
                raise HelloError("host name")
            found = value.decode("ascii").lower()
    return found


def _alpn(ext: _Reader) -> tuple[bytes, ...]:
    lst = ext.vector(2, "protocol list")
    if not ext.done() or lst.done():
        raise HelloError("ALPN extension")
    out = []
    while not lst.done():
        proto = bytes(lst.vector(1, "protocol").take_rest())
        if not proto:
            raise HelloError("empty protocol name")
        out.append(proto)
    return tuple(out)
