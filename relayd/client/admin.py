"""The admin REST API as a client calls it over HTTPS (`relayd admin --api
URL`, docs/api.md): the admin key as ``Authorization: Bearer``, the relay
verified against the CA it is given (a PEM file), against the CA fetched
and checked against its SHA-256 pin (as an agent checks the pin in its join
token: the relay's ``/_relayd/v1/ca``, read once unverified, holds no
secret), or against the system's CAs (a relay with a public certificate).

Blocking ``http.client``, one connection per call: the command line makes
a handful of calls.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse

from relayd.errors import ConfigError, RelaydError, TemporaryError
from relayd.net import tls

PREFIX = "/api/v1"
#: The largest answer read (a big policy document or agent list fits).
MAX_ANSWER = 64 << 20


class TlsError(RelaydError):
    """The relay's certificate does not verify against the trust given."""


def parse_url(url: str) -> tuple[str, int]:
    """``https://HOST[:PORT][/api/v1]`` -> (host, port)."""
    u = urllib.parse.urlsplit(url.strip())
    try:
        port = u.port or 443
    except ValueError:
        port = None
    if u.scheme != "https" or not u.hostname or port is None or u.query or u.fragment or \
            u.path.rstrip("/") not in ("", PREFIX) or u.username or u.password:
        raise ConfigError(f"--api: expected https://HOST[:PORT] (the relay's HTTPS port), not {url[:100]!r}")
    return u.hostname, port


def context(url: str, ca_file: str | None = None, pin: str | None = None) -> ssl.SSLContext:
    """The TLS context that trusts the relay: its CA file, its CA fetched
    and checked against ``pin`` (both offering the relay's own ALPN, which
    gets its own certificate where a public one serves the name), or the
    system's CAs (the public certificate)."""
    if ca_file and pin:
        raise ConfigError("give --ca FILE or --pin SHA256, not both")
    if ca_file:
        return tls.relay_client_context(ca_file)
    if pin:
        from relayd.client.zerotrust import ZtClientError, fetch_ca

        host, port = parse_url(url)
        try:
            pem = fetch_ca(f"https://{host}:{port}", pin)
        except ZtClientError as exc:
            raise TlsError(f"--pin: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TemporaryError(f"cannot reach {host}:{port} for its CA: {exc}") from None
        ctx = ssl.create_default_context(cadata=pem.decode())
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols([tls.RELAY_ALPN, "http/1.1"])
        return ctx
    return ssl.create_default_context()


class AdminClient:
    """``request(method, path, body, headers) -> (status, content type,
    body)`` for a path under /api/v1, over HTTPS with the admin key."""

    def __init__(self, url: str, key: str, ctx: ssl.SSLContext, timeout: float = 30.0) -> None:
        self.host, self.port = parse_url(url)
        self.key = key
        self.ctx = ctx
        self.timeout = timeout

    def request(self, method: str, path: str, body: bytes = b"", headers: tuple = ()) -> tuple[int, str, bytes]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=self.timeout)
        where = f"{self.host}:{self.port}"
        try:
            h = {k.decode(): v.decode() for k, v in headers}
            h["Authorization"] = f"Bearer {self.key}"
            conn.request(method, PREFIX + path, body or None, h)
            r = conn.getresponse()
            data = r.read(MAX_ANSWER)
            return r.status, r.getheader("Content-Type", ""), data
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(f"{where}: the relay's certificate does not verify ({exc.verify_message}): give its CA "
                           "with --ca FILE or --pin SHA256") from None
        except (OSError, http.client.HTTPException) as exc:
            raise TemporaryError(f"cannot reach the relay's API at {where}: {exc or type(exc).__name__}") from None
        finally:
            conn.close()
