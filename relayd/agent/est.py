"""The agent's EST client (RFC 7030; docs/device-cloud.md): the three requests a
device makes, ``cacerts``, ``simpleenroll`` with its OTP and
``simplereenroll`` with its current certificate, over one short HTTPS
connection each.

A relay answers with one base64 line (or wrapped lines, which other EST
servers send) of a certs-only CMS SignedData; the device takes the first
certificate that is not a CA as its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from relayd.config import format_hostport
from relayd.errors import AuthError, ConfigError, TemporaryError

PATH = "/.well-known/est"
#: The largest answer read (a certificate chain is a few KiB).
MAX_REPLY = 256 * 1024


class EstRefused(AuthError):
    """The relay refused (4xx): the message says how."""


class EstUnavailable(TemporaryError):
    """No answer, or the relay failed (5xx): try again later."""


def parse_base(url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of ``https://HOST[:PORT][/.well-known/est]``."""
    u = urllib.parse.urlsplit(url.strip())
    try:
        port = u.port or 443
    except ValueError:
        port = 0
    if u.scheme != "https" or not u.hostname or not 0 < port < 65536 or u.query or u.fragment:
        raise ConfigError("--est: the relay's HTTPS address, https://HOST[:PORT]")
    path = u.path.rstrip("/")
    if path not in ("", PATH):
        raise ConfigError(f"--est: https://HOST[:PORT] or https://HOST[:PORT]{PATH}")
    return u.hostname, port, PATH


def address(url: str) -> str:
    host, port, _ = parse_base(url)
    return format_hostport((host, port))


def read_certs(body: bytes) -> list[x509.Certificate]:
    """The certificates of a certs-only reply (base64, wrapped or not)."""
    try:
        der = base64.b64decode(b"".join(body.split()), validate=True)
        return pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError):
        raise EstRefused("the relay's EST answer is not a certs-only PKCS#7") from None


async def call(url: str, op: str, ctx: ssl.SSLContext, *, body: bytes = b"", authorization: str | None = None,
               timeout: float = 10.0) -> bytes:
    """One EST request; the answer's body on 200, EstRefused on 4xx,
    EstUnavailable otherwise."""
    host, port, prefix = parse_base(url)
    method = "POST" if body else "GET"
    head = [f"{method} {prefix}/{op} HTTP/1.1", f"Host: {format_hostport((host, port))}", "Connection: close",
            "Accept: */*"]
    if body:
        head += ["Content-Type: application/pkcs10", f"Content-Length: {len(body)}"]
    if authorization:
        head.append(f"Authorization: {authorization}")
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
            try:
                w.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                raw = await r.read(MAX_REPLY + 8192)
            finally:
                w.close()
    except (OSError, asyncio.TimeoutError, EOFError) as exc:  # ssl errors included
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise EstRefused(f"the relay's TLS certificate does not verify: {exc.verify_message}") from None
        raise EstUnavailable(f"EST {op} at {host}:{port}: {str(exc) or type(exc).__name__}") from None
    status, headers, payload = _response(raw)
    if status == 200:
        return payload
    reason = payload[:200].decode("utf-8", "replace").strip()
    if 400 <= status < 500:
        raise EstRefused(f"EST {op} refused ({status}): {reason}")
    raise EstUnavailable(f"EST {op} failed ({status}): {reason}")


def _response(raw: bytes) -> tuple[int, dict, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise EstUnavailable("the relay's EST answer is not HTTP") from None
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if not sep:
        raise EstUnavailable("the relay's EST answer was cut short")
    if b"content-length" in headers:
        try:
            body = body[:int(headers[b"content-length"])]
        except ValueError:
            raise EstUnavailable("the relay's EST answer is not HTTP") from None
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = _dechunk(body)
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            raise EstUnavailable("the relay's EST answer was cut short")
        try:
            size = int(data[pos:line_end].split(b";")[0], 16)
        except ValueError:
            raise EstUnavailable("the relay's EST answer is not HTTP") from None
        if size == 0:
            return b"".join(out)
        out.append(data[line_end + 2:line_end + 2 + size])
        pos = line_end + 4 + size


def basic(otp: str) -> str:
    """The OTP as a Basic password (the user name is only a hint)."""
    return "Basic " + base64.b64encode(b"relayd-agent:" + otp.strip().encode()).decode()
