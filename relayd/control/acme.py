"""An ACME client (RFC 8555) with the HTTP-01 and TLS-ALPN-01 challenges.

Theory of operation
-------------------
The relay gets public certificates for its host names from an ACME CA (Let's
Encrypt, or any RFC 8555 server: pebble in the tests). This module is the
protocol; relayd.gateway.certs decides when to ask and serves the answers.

* **Account.** One key per data directory (``acme/account.key``, ECDSA
  P-256, signing ES256; an existing RSA key of 2048 bits or more is used
  with RS256). ``newAccount`` with that key returns the same account every
  time (RFC 8555 7.3.1), so the account URL is only a cache
  (``acme/account.json``); a server that no longer knows it
  (``accountDoesNotExist``) gets the key registered again.
* **Requests** are JWS in flattened JSON (RFC 7515 7.2.2) carrying the
  request URL and a fresh nonce in the protected header, ``jwk`` for
  ``newAccount`` and the account URL (``kid``) after. Each response brings
  the next nonce; a ``badNonce`` answer is retried with the nonce it came
  with (at most ``NONCE_RETRIES`` times). GETs are POST-as-GET.
* **An order** (``issue``): ``newOrder`` for the names, each pending
  authorization answered by the configured challenge (the caller's
  ``present`` makes the relay answer it: a file under
  ``/.well-known/acme-challenge/`` or a TLS-ALPN-01 certificate, RFC 8737),
  polled until valid, honouring ``Retry-After``; then ``finalize`` with a CSR
  for a new P-256 key, polling until the certificate is ready, and the
  chain downloaded and checked (the leaf carries our key and every name).
* **Errors.** Every answer of the server is untrusted input: bodies are
  bounded (``MAX_BODY``), JSON is read into typed values with every field
  checked, a problem document (RFC 7807) becomes ``AcmeProblem`` with the
  short name of its type as ``kind`` (a bounded metric label) and its detail
  cut to printable text, so that a log line can quote it. Anything else that
  goes wrong is an ``AcmeError`` with a kind of its own (``network``,
  ``timeout``, ``bad_response``, ``challenge``, ...). Nothing here logs; no
  message carries a key, a nonce or a signature.

Blocking I/O (``http.client``), run by the caller in a worker thread;
``cancel`` (a threading.Event) ends waits at once and aborts the request in
flight.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from relayd.control.ca import UNREADABLE, read_private_key
from relayd.errors import ConfigError, RelaydError

#: Bytes of one answer of the ACME server at most (a chain is a few KiB).
MAX_BODY = 1 << 20
#: Characters of the server's own text (a problem's detail) quoted in a message.
MAX_TEXT = 300
#: Seconds one HTTP request may take.
REQUEST_TIMEOUT = 15.0
#: Times a request is sent again after a badNonce answer.
NONCE_RETRIES = 3
#: Seconds between polls when the server gives no Retry-After (the first
#: polls come sooner: FIRST_POLL, doubling), and the most a Retry-After is
#: honoured for while an order is being worked on.
POLL_INTERVAL = 2.0
FIRST_POLL = 0.2
MAX_POLL_WAIT = 60.0
#: Seconds an order may take from newOrder to the downloaded chain.
ORDER_DEADLINE = 300.0
CHALLENGES = ("http-01", "tls-alpn-01")
#: RFC 8737 3: the ALPN protocol and the certificate extension of TLS-ALPN-01.
ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ERROR_NS = "urn:ietf:params:acme:error:"
#: The problem types of RFC 8555 6.7 (and RFC 8737, 8738): a problem's kind
#: is one of these short names or "other", so that a metric label stays bounded.
PROBLEM_TYPES = frozenset({
    "accountDoesNotExist", "alreadyRevoked", "badCSR", "badNonce", "badPublicKey", "badRevocationReason",
    "badSignatureAlgorithm", "caa", "compound", "connection", "dns", "externalAccountRequired",
    "incorrectResponse", "invalidContact", "malformed", "orderNotReady", "rateLimited", "rejectedIdentifier",
    "serverInternal", "tls", "unauthorized", "unsupportedContact", "unsupportedIdentifier", "userActionRequired",
})
#: Kinds of errors that are not the server's problem documents.
LOCAL_KINDS = frozenset({"network", "timeout", "bad_response", "challenge", "order", "cancelled", "http_status"})

_DNS_NAME = re.compile(r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}\Z")
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,512}\Z")
_EMAIL = re.compile(r"[^@\s,:<>\"'/\\]{1,64}@[A-Za-z0-9.-]{1,253}\Z")


class AcmeError(RelaydError):
    """An order or account request that failed; ``kind`` is a short,
    bounded label (a problem type's short name, or one of LOCAL_KINDS)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class AcmeProblem(AcmeError):
    """The server's problem document (RFC 7807, RFC 8555 6.7)."""

    def __init__(self, kind: str, message: str, status: int = 0, subproblems: tuple = ()) -> None:
        super().__init__(kind, message)
        self.status = status
        self.subproblems = subproblems


# --- configuration ----------------------------------------------------------------------------


@dataclass
class AcmeConfig:
    """``[acme]`` of the relay's config (docs/acme.md)."""

    #: The CA's directory URL (https).
    directory: str = ""
    #: Contact address given to the CA (optional).
    email: str | None = None
    #: How the relay proves it controls a name: "http-01" or "tls-alpn-01".
    challenge: str = "http-01"
    #: Where the plain-HTTP listener for HTTP-01 binds (port 80 is where the
    #: CA connects; behind a port forward, any address).
    http_listen: tuple[str, int] | None = ("0.0.0.0", 80)
    #: Seconds before expiry a certificate is renewed; None: when a third of
    #: its lifetime is left.
    renew_before: float | None = None
    #: A PEM file of CA certificates that the directory's HTTPS is verified
    #: against (a private ACME CA, pebble's in tests); None: the system's.
    ca: Path | None = None
    #: The names to get certificates for; None: the relay's own DNS names
    #: and the host of every HTTP endpoint.
    names: list[str] | None = None
    #: Seconds before the first retry after a failed order; doubles after
    #: each failure up to ``retry_max``.
    retry: float = 60.0
    retry_max: float = 86400.0

    def validate(self) -> "AcmeConfig":
        check_directory_url(self.directory, "acme.directory")
        if self.email is not None and not _EMAIL.match(self.email):
            raise ConfigError("config key 'acme.email': expected one address like ops@example.com")
        if self.challenge not in CHALLENGES:
            raise ConfigError(f"config key 'acme.challenge': {self.challenge!r} is not one of {', '.join(CHALLENGES)}")
        if self.challenge == "http-01" and self.http_listen is None:
            raise ConfigError("config key 'acme.http_listen': http-01 needs the plain-HTTP listener")
        if self.renew_before is not None and not 1 <= self.renew_before <= 180 * 86400:
            raise ConfigError("config key 'acme.renew_before': between 1s and 180d")
        if self.ca is not None:
            try:
                ssl.create_default_context(cafile=str(self.ca))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"config key 'acme.ca': cannot load {self.ca} as PEM CA certificates "
                                  f"({getattr(exc, 'strerror', None) or exc})") from None
        for n in self.names or ():
            if not is_dns_name(n):
                raise ConfigError(f"config key 'acme.names': {n[:100]!r} is not a DNS name an ACME CA can certify")
        if not 1 <= self.retry <= self.retry_max:
            raise ConfigError("config key 'acme.retry': at least 1s and at most acme.retry_max")
        return self


def check_directory_url(url, key: str) -> str:
    """An https:// URL with a host and no credentials, fragment or blanks."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"config key '{key}': the CA's directory URL, like https://acme-v02.api.letsencrypt.org/"
                          "directory")
    shown = url[:200]
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        raise ConfigError(f"config key '{key}': {shown!r} is not a URL") from None
    if u.scheme != "https" or not u.hostname or any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"config key '{key}': {shown!r} is not an https:// URL with a host")
    if u.username is not None or u.password is not None or u.fragment:
        raise ConfigError(f"config key '{key}': {shown!r}: no user, password or fragment in the directory URL")
    if port == 0:
        raise ConfigError(f"config key '{key}': {shown!r}: port 0")
    return url


def is_dns_name(name) -> bool:
    """A name an ACME CA can certify: lower-case LDH labels with a dot, not an
    IP address, no wildcard (HTTP-01 and TLS-ALPN-01 cannot prove one)."""
    if not isinstance(name, str) or not _DNS_NAME.match(name):
        return False
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return not name.endswith(".localhost") and name != "localhost"


# --- reading the server's answers ------------------------------------------------------------


def clean_text(text, limit: int = MAX_TEXT) -> str:
    """The server's text as it may reach a log line: printable, one line, cut."""
    if not isinstance(text, str):
        return ""
    out = "".join(c if c.isprintable() else " " for c in text[: limit + 1])
    return out[:limit] + ("..." if len(out) > limit else "")


def parse_json(body: bytes, what: str) -> dict:
    """A JSON object, or AcmeError(bad_response)."""
    if len(body) > MAX_BODY:
        raise AcmeError("bad_response", f"{what}: answer larger than {MAX_BODY} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise AcmeError("bad_response", f"{what}: answer is not JSON") from None
    if not isinstance(doc, dict):
        raise AcmeError("bad_response", f"{what}: answer is not a JSON object")
    return doc


def _problem_kind(value) -> str:
    if isinstance(value, str) and value.startswith(ERROR_NS):
        short = value[len(ERROR_NS):]
        return short if short in PROBLEM_TYPES else "other"
    return "other"


def _identifier_text(value) -> str:
    if isinstance(value, dict) and isinstance(value.get("value"), str):
        return clean_text(value["value"], 100)
    return ""


def problem_of(status: int, content_type: str, body: bytes, what: str) -> AcmeProblem:
    """The error an answer with a failure status stands for: its problem
    document when it has one, else a problem naming the status."""
    doc = None
    if "json" in (content_type or "").lower():
        try:
            doc = parse_json(body, what)
        except AcmeError:
            doc = None
    if doc is None:
        return AcmeProblem("http_status", f"{what}: the ACME server answered HTTP {status} without a problem "
                                          "document", status)
    kind = _problem_kind(doc.get("type"))
    detail = clean_text(doc.get("detail"))
    subs = []
    raw_subs = doc.get("subproblems")
    if isinstance(raw_subs, list):
        for s in raw_subs[:10]:
            if isinstance(s, dict):
                ident = _identifier_text(s.get("identifier"))
                subs.append((_problem_kind(s.get("type")), ident, clean_text(s.get("detail"), 150)))
    text = f"{what}: {kind}" + (f": {detail}" if detail else "")
    for k, ident, d in subs:
        text += f"; {ident or '?'}: {k}" + (f": {d}" if d else "")
    return AcmeProblem(kind, text, status, tuple(subs))


def error_of(doc, what: str) -> AcmeProblem | None:
    """An ``error`` field (an order's, an authorization's, a challenge's)."""
    if not isinstance(doc, dict):
        return None
    kind = _problem_kind(doc.get("type"))
    detail = clean_text(doc.get("detail"))
    return AcmeProblem(kind, f"{what}: {kind}" + (f": {detail}" if detail else ""))


def _url(doc: dict, key: str, what: str, required: bool = True) -> str | None:
    v = doc.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or len(v) > 2048:
        raise AcmeError("bad_response", f"{what}: '{key}' is missing or not a URL")
    try:
        u = urllib.parse.urlsplit(v)
        u.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:  # "https://[", a bad port
        raise AcmeError("bad_response", f"{what}: '{key}' is not a URL") from None
    if u.scheme != "https" or not u.netloc or any(c.isspace() or ord(c) < 32 or ord(c) > 126 for c in v):
        raise AcmeError("bad_response", f"{what}: '{key}' is not an https:// URL")
    return v


def _status(doc: dict, allowed: tuple[str, ...], what: str) -> str:
    v = doc.get("status")
    if v not in allowed:
        raise AcmeError("bad_response", f"{what}: status {clean_text(str(v), 40)!r} is not one of "
                                        f"{', '.join(allowed)}")
    return v


@dataclass(frozen=True)
class Directory:
    new_nonce: str
    new_account: str
    new_order: str
    terms: str | None = None


def parse_directory(doc: dict) -> Directory:
    meta = doc.get("meta")
    terms = meta.get("termsOfService") if isinstance(meta, dict) else None
    return Directory(_url(doc, "newNonce", "directory"), _url(doc, "newAccount", "directory"),
                     _url(doc, "newOrder", "directory"),
                     terms if isinstance(terms, str) else None)


ORDER_STATUSES = ("pending", "ready", "processing", "valid", "invalid")
AUTHZ_STATUSES = ("pending", "valid", "invalid", "deactivated", "expired", "revoked")
CHALLENGE_STATUSES = ("pending", "processing", "valid", "invalid")


@dataclass(frozen=True)
class Order:
    status: str
    authorizations: tuple[str, ...]
    finalize: str
    certificate: str | None = None
    error: AcmeProblem | None = None


def parse_order(doc: dict) -> Order:
    status = _status(doc, ORDER_STATUSES, "order")
    authz = doc.get("authorizations")
    if not isinstance(authz, list) or not 1 <= len(authz) <= 100:
        raise AcmeError("bad_response", "order: 'authorizations' is not a list of 1 to 100 URLs")
    urls = tuple(_url({"u": a}, "u", "order authorization") for a in authz)
    return Order(status, urls, _url(doc, "finalize", "order"),
                 _url(doc, "certificate", "order", required=status == "valid"),
                 error_of(doc.get("error"), "order"))


@dataclass(frozen=True)
class Challenge:
    type: str
    url: str
    status: str
    token: str | None
    error: AcmeProblem | None = None


@dataclass(frozen=True)
class Authorization:
    status: str
    name: str
    challenges: tuple[Challenge, ...] = field(default=())
    wildcard: bool = False

    def challenge(self, kind: str) -> Challenge | None:
        return next((c for c in self.challenges if c.type == kind), None)


def parse_authorization(doc: dict) -> Authorization:
    status = _status(doc, AUTHZ_STATUSES, "authorization")
    ident = doc.get("identifier")
    if not isinstance(ident, dict) or ident.get("type") != "dns" or not isinstance(ident.get("value"), str) \
            or not is_dns_name(ident["value"].lower()):
        raise AcmeError("bad_response", "authorization: 'identifier' is not a DNS name")
    raw = doc.get("challenges")
    if not isinstance(raw, list) or len(raw) > 20:
        raise AcmeError("bad_response", "authorization: 'challenges' is not a list")
    out = []
    for c in raw:
        if not isinstance(c, dict) or not isinstance(c.get("type"), str):
            raise AcmeError("bad_response", "authorization: a challenge without a type")
        kind = c["type"]
        if kind not in CHALLENGES:
            continue  # dns-01 and others: not ours to answer, not ours to check
        token = c.get("token")
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise AcmeError("bad_response", f"authorization: the {kind} challenge's token is not base64url")
        out.append(Challenge(kind, _url(c, "url", f"{kind} challenge"),
                             _status(c, CHALLENGE_STATUSES, f"{kind} challenge"), token,
                             error_of(c.get("error"), f"{kind} challenge")))
    return Authorization(status, ident["value"].lower(), tuple(out), doc.get("wildcard") is True)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or an
    HTTP-date, RFC 9110 10.2.3), never negative; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit() and value.isascii():
        return float(min(int(value[:12]), 10 ** 9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    try:
        return max(0.0, when.timestamp() - now)
    except (OverflowError, OSError, ValueError):
        return None


def parse_chain(body: bytes) -> list[x509.Certificate]:
    """A PEM certificate chain (application/pem-certificate-chain, RFC 8555
    9.1): the leaf first, nothing but certificates."""
    if len(body) > MAX_BODY:
        raise AcmeError("bad_response", "certificate: chain larger than the limit")
    text = body.replace(b"\r\n", b"\n")
    if text.count(b"-----BEGIN ") != text.count(b"-----BEGIN CERTIFICATE-----"):
        raise AcmeError("bad_response", "certificate: the chain holds something other than certificates")
    try:
        certs = x509.load_pem_x509_certificates(text)
    except UNREADABLE:
        raise AcmeError("bad_response", "certificate: the chain is not PEM certificates") from None
    if not certs or len(certs) > 10:
        raise AcmeError("bad_response", "certificate: expected 1 to 10 certificates in the chain")
    return certs


def dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of a certificate's SAN (lower case)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName) if isinstance(n, str)]


# --- keys and JWS ----------------------------------------------------------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_b64u(n: int, size: int | None = None) -> str:
    return b64u(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, no blanks."""
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return b64u(hashlib.sha256(canonical).digest())


class AccountKey:
    """The account's key pair, as JWS needs it (RFC 7518 3.4 and 3.3, RFC 7638)."""

    def __init__(self, key) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            nums = key.public_key().public_numbers()
            self.alg = "ES256"
            self.jwk = {"crv": "P-256", "kty": "EC", "x": _int_b64u(nums.x, 32), "y": _int_b64u(nums.y, 32)}
        elif isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
            nums = key.public_key().public_numbers()
            self.alg = "RS256"
            self.jwk = {"e": _int_b64u(nums.e), "kty": "RSA", "n": _int_b64u(nums.n)}
        else:
            raise ConfigError("an ACME account key must be ECDSA P-256 or RSA of 2048 bits or more")
        self._key = key
        self.thumbprint = jwk_thumbprint(self.jwk)

    def sign(self, data: bytes) -> bytes:
        if self.alg == "ES256":
            r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def jws(self, url: str, nonce: str, payload, kid: str | None) -> bytes:
        """A flattened JWS: ``payload`` a JSON-able value, or None for
        POST-as-GET (the empty payload)."""
        protected = {"alg": self.alg, "nonce": nonce, "url": url}
        if kid is None:
            protected["jwk"] = self.jwk
        else:
            protected["kid"] = kid
        p64 = b64u(json.dumps(protected, separators=(",", ":")).encode())
        b64 = "" if payload is None else b64u(json.dumps(payload, separators=(",", ":")).encode())
        sig = self.sign(f"{p64}.{b64}".encode("ascii"))
        return json.dumps({"protected": p64, "payload": b64, "signature": b64u(sig)}).encode()

    def key_authorization(self, token: str) -> str:
        """RFC 8555 8.1."""
        return f"{token}.{self.thumbprint}"


def new_account_key() -> bytes:
    """A new P-256 account key, PKCS#8 PEM."""
    return _pem(ec.generate_private_key(ec.SECP256R1()))


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_account_key(path: Path) -> AccountKey:
    """The account key in ``path``: only its owner may read it, unencrypted
    PEM, P-256 or RSA; ConfigError naming the file otherwise (never its content).
    FileNotFoundError if there is none yet."""
    key = read_private_key(path)
    try:
        return AccountKey(key)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def new_key_and_csr(names: list[str]) -> tuple[bytes, bytes]:
    """A new P-256 key (PEM) and a CSR (DER) for ``names``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]) if len(names[0]) <= 64
                         else x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
           .sign(key, hashes.SHA256()))
    return _pem(key), csr.public_bytes(serialization.Encoding.DER)


def tls_alpn_certificate(name: str, key_authorization: str) -> tuple[bytes, bytes]:
    """RFC 8737 3: a self-signed certificate for exactly ``name`` with the
    critical acmeIdentifier extension holding SHA-256(key authorization).
    Returns ``(cert_pem, key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd ACME challenge")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            # The value is an ASN.1 OCTET STRING of the 32-byte digest.
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem(key)


# --- HTTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict  # lower-case name -> first value
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


class _Connection(http.client.HTTPSConnection):
    """An HTTPSConnection whose ``sock`` is the socket from the start, TLS
    handshake included, so that another thread can shut it down (the
    standard one detaches the TCP socket while it handshakes)."""

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock.do_handshake()


class Transport:
    """Blocking HTTPS to the ACME server: one connection per request,
    bounded answers, nothing followed (no redirects)."""

    def __init__(self, ca: Path | None, cancel: threading.Event, timeout: float = REQUEST_TIMEOUT) -> None:
        self.ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.cancel = cancel
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()

    def request(self, method: str, url: str, body: bytes | None = None, content_type: str | None = None,
                accept: str = "application/json") -> Response:
        if self.cancel.is_set():
            raise AcmeError("cancelled", "stopped")
        u = urllib.parse.urlsplit(url)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        headers = {"User-Agent": "relayd-acme", "Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        conn = _Connection(u.hostname, u.port or 443, context=self.ctx, timeout=self.timeout)
        with self._lock:
            self._conn = conn
        where = f"{method} {u.hostname}{u.path[:80]}"
        try:
            conn.request(method, target, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read(MAX_BODY + 1)
            hdrs = {k.lower(): v for k, v in reversed(r.getheaders())}
        except (socket.timeout, TimeoutError):
            raise AcmeError("timeout", f"{where}: no answer within {self.timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise AcmeError("network", f"{where}: the server's certificate does not verify "
                                       f"({clean_text(exc.verify_message, 100)}); see acme.ca") from None
        except (OSError, http.client.HTTPException) as exc:
            if self.cancel.is_set():
                raise AcmeError("cancelled", "stopped") from None
            raise AcmeError("network", f"{where}: {clean_text(str(exc) or type(exc).__name__, 150)}") from None
        finally:
            with self._lock:
                self._conn = None
            conn.close()
        if len(data) > MAX_BODY:
            raise AcmeError("bad_response", f"{where}: answer larger than {MAX_BODY} bytes")
        return Response(r.status, hdrs, data)

    def abort(self) -> None:
        """From another thread: end the request in flight now."""
        with self._lock:
            conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # under TLS too: the blocked read returns
            except OSError:
                pass


# --- the client ------------------------------------------------------------------------------

#: present(name, challenge_type, token, key_authorization) / cleanup(name, challenge_type, token)
Present = Callable[[str, str, str, str], None]
Cleanup = Callable[[str, str, str], None]


class AcmeClient:
    """One account at one ACME server."""

    def __init__(self, directory_url: str, key: AccountKey, *, email: str | None = None, ca: Path | None = None,
                 account_url: str | None = None, transport: Transport | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.directory_url = directory_url
        self.key = key
        self.email = email
        self.account_url = account_url
        self.cancel = cancel or threading.Event()
        self.http = transport or Transport(ca, self.cancel)
        self._dir: Directory | None = None
        self._nonce: str | None = None

    # -- plumbing --

    def _sleep(self, seconds: float) -> None:
        if self.cancel.wait(seconds):
            raise AcmeError("cancelled", "stopped")

    def directory(self) -> Directory:
        if self._dir is None:
            what = f"directory {clean_text(self.directory_url, 120)}"
            r = self.http.request("GET", self.directory_url)
            if r.status != 200:
                raise problem_of(r.status, r.content_type, r.body, what)
            self._dir = parse_directory(parse_json(r.body, what))
        return self._dir

    def _take_nonce(self, r: Response) -> None:
        n = r.headers.get("replay-nonce")
        self._nonce = n if isinstance(n, str) and _NONCE.match(n) else None

    def _new_nonce(self) -> str:
        if self._nonce is None:
            r = self.http.request("HEAD", self.directory().new_nonce)
            self._take_nonce(r)
            if self._nonce is None:
                raise AcmeError("bad_response", "newNonce: no usable Replay-Nonce header")
        nonce, self._nonce = self._nonce, None
        return nonce

    def post(self, url: str, payload, what: str, *, use_kid: bool = True,
             accept: str = "application/json") -> Response:
        """A signed request; a failure status raises its problem. badNonce
        is retried with the nonce that came with it."""
        for attempt in range(NONCE_RETRIES + 1):
            body = self.key.jws(url, self._new_nonce(), payload, self.account_url if use_kid else None)
            r = self.http.request("POST", url, body, "application/jose+json", accept)
            self._take_nonce(r)
            if r.status < 400:
                return r
            problem = problem_of(r.status, r.content_type, r.body, what)
            if problem.kind != "badNonce" or attempt == NONCE_RETRIES:
                raise problem
        raise AssertionError("unreachable")

    def _get(self, url: str, what: str, parse):
        r = self.post(url, None, what)
        return parse(parse_json(r.body, what)), r

    def _wait(self, r: Response, deadline: float, n: int) -> None:
        """Before the ``n``-th poll: the server's Retry-After, else a short
        wait that grows to POLL_INTERVAL."""
        delay = parse_retry_after(r.headers.get("retry-after"))
        if delay is None:
            delay = min(POLL_INTERVAL, FIRST_POLL * 2 ** min(n, 10))
        delay = min(max(delay, FIRST_POLL), MAX_POLL_WAIT)
        if time.monotonic() + delay > deadline:
            raise AcmeError("timeout", "the order took longer than allowed")
        self._sleep(delay)

    def _poll(self, url: str, what: str, parse, busy: tuple[str, ...], r: Response | None, deadline: float):
        """GET ``url`` until its status is not in ``busy``; with ``r`` (the
        answer that started the work), wait as it says before the first GET."""
        n = 0
        while True:
            if r is not None:
                self._wait(r, deadline, n)
                n += 1
            obj, r = self._get(url, what, parse)
            if obj.status not in busy:
                return obj

    # -- account --

    def register(self) -> str:
        """newAccount (agreeing to the terms): the account URL of this key,
        new or existing."""
        payload: dict = {"termsOfServiceAgreed": True}
        if self.email:
            payload["contact"] = [f"mailto:{self.email}"]
        r = self.post(self.directory().new_account, payload, "newAccount", use_kid=False)
        loc = r.headers.get("location")
        if r.status not in (200, 201) or not loc:
            raise AcmeError("bad_response", "newAccount: no account URL (Location) in the answer")
        self.account_url = _url({"l": loc}, "l", "newAccount")
        return self.account_url

    # -- an order --

    def issue(self, names: list[str], challenge: str, present: Present, cleanup: Cleanup,
              deadline: float = ORDER_DEADLINE) -> tuple[bytes, bytes]:
        """Order a certificate for ``names`` and prove control with
        ``challenge``: returns ``(chain_pem, key_pem)``."""
        if self.account_url is None:
            self.register()
        try:
            return self._issue(names, challenge, present, cleanup, time.monotonic() + deadline)
        except AcmeProblem as exc:
            if exc.kind != "accountDoesNotExist":
                raise
        # The server forgot the account (or never had it): register the key again.
        self.account_url = None
        self.register()
        return self._issue(names, challenge, present, cleanup, time.monotonic() + deadline)

    def _issue(self, names, challenge, present, cleanup, deadline) -> tuple[bytes, bytes]:
        payload = {"identifiers": [{"type": "dns", "value": n} for n in names]}
        r = self.post(self.directory().new_order, payload, "newOrder")
        order_url = _url({"l": r.headers.get("location")}, "l", "newOrder")
        order = parse_order(parse_json(r.body, "newOrder"))
        for authz_url in order.authorizations:
            self._authorize(authz_url, challenge, present, cleanup, deadline)
        if order.status == "pending":
            order = self._poll(order_url, "order", parse_order, ("pending",), None, deadline)
        if order.status != "ready":
            raise order.error or AcmeError("order", f"order: {order.status} after the authorizations")
        key_pem, csr = new_key_and_csr(names)
        r = self.post(order.finalize, {"csr": b64u(csr)}, "finalize")
        order = parse_order(parse_json(r.body, "finalize"))
        if order.status in ("ready", "processing"):
            order = self._poll(order_url, "order", parse_order, ("ready", "processing"), r, deadline)
        if order.status != "valid":
            raise order.error or AcmeError("order", f"order: {order.status} after finalize")
        r = self.post(order.certificate, None, "certificate", accept="application/pem-certificate-chain")
        chain = parse_chain(r.body)
        self._check_leaf(chain[0], key_pem, names)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain), key_pem

    def _authorize(self, url: str, challenge: str, present: Present, cleanup: Cleanup, deadline: float) -> None:
        authz, r = self._get(url, "authorization", parse_authorization)
        if authz.status == "valid":
            return  # proven recently: the CA reuses it
        if authz.status != "pending":
            raise AcmeError("order", f"authorization for {authz.name}: {authz.status}")
        ch = authz.challenge(challenge)
        if ch is None:
            raise AcmeError("challenge", f"authorization for {authz.name}: the CA offers no {challenge} challenge")
        present(authz.name, ch.type, ch.token, self.key.key_authorization(ch.token))
        try:
            if ch.status == "pending":
                r = self.post(ch.url, {}, f"{challenge} challenge")
            authz = self._poll(url, "authorization", parse_authorization, ("pending",), r, deadline)
        finally:
            cleanup(authz.name, ch.type, ch.token)
        if authz.status != "valid":
            failed = next((c.error for c in authz.challenges if c.error is not None), None)
            if failed is not None:
                # The CA's text may quote the token and key authorization: not secrets, but no log needs them.
                text = str(failed).replace(ch.token, "<token>").replace(self.key.thumbprint, "<thumbprint>")
                raise AcmeProblem(failed.kind, f"{authz.name}: {text}")
            raise AcmeError("challenge", f"authorization for {authz.name}: {authz.status}")

    @staticmethod
    def _check_leaf(leaf: x509.Certificate, key_pem: bytes, names: list[str]) -> None:
        key = serialization.load_pem_private_key(key_pem, None)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                key.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise AcmeError("bad_response", "certificate: the leaf does not carry the key of our CSR")
        missing = set(names) - set(dns_names(leaf))
        if missing:
            raise AcmeError("bad_response", f"certificate: the leaf does not name {', '.join(sorted(missing))}")
