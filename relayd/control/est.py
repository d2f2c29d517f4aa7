"""EST (RFC 7030) on the relay: device certificates for provisioning OTPs
(issue 13 item 2; ../shared/specs/device-cloud.md sections 6 and 7.2).

Theory of operation
-------------------
The HTTPS front door sends ``/.well-known/est/...`` on the relay's own host
names here, whole (at most MAX_BODY bytes; more is 413 before anything is
parsed). ``EstServer.handle`` answers one request:

* ``cacerts`` (GET, no authentication): the relay CA as a certs-only CMS
  SignedData. A device checks it against the SHA-256 pin that came with its
  OTP before it trusts the TLS connection it fetched it over.
* ``simpleenroll`` (POST): ``read_csr`` checks the media type (415), decodes
  the base64 (line breaks or not; PEM too, leniently) and the PKCS#10, and
  checks its signature (proof of possession) and key type (400). Then
  ``credential`` finds the OTP: a Basic password (the user name is ignored),
  a Bearer token, or the CSR's challengePassword, in that order. An OTP that
  is missing, unknown, used, revoked or expired is one 401 with one
  ``WWW-Authenticate``: nothing tells a guesser which. The certificate
  ignores the CSR's subject: CN and SAN name a new device id. The OTP is
  spent and the device recorded in one transaction (relayd.control.
  provisioning.Otps.redeem) after the CA signed, so a refusal or a failure
  on the way leaves the OTP valid and a race gives one device.
* ``simplereenroll`` (POST): the TLS client certificate (asked for, not
  required, at the handshake) must be one the relay CA issued and the store
  has not revoked (401 without one; 403 revoked); the new certificate names
  the same device.
* ``csrattrs``: 204 (no attributes wanted). ``serverkeygen``, ``fullcmc``
  and CA labels: 404, not offered.

Answers are one unbroken line of base64 (strongSwan 5.9's client cannot
read wrapped lines) with ``Content-Transfer-Encoding: base64``. Every answer
is counted in ``relayd_est_requests_total{op, status}``, every refusal also
in ``relayd_bad_input_total{where="est", kind}``, and logged (rate limited)
with its operation, status, reason and client (rate limited per reason):
never an OTP, a header or a body.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID

from relayd import metrics
from relayd.control.ca import DEVICE_KEYS, cert_info, key_allowed
from relayd.core import http1
from relayd.errors import AuthError, RevokedError
from relayd.log import RateLimitedLog, caught

log = logging.getLogger("relayd.est")
_LOG = RateLimitedLog(log)

PREFIX = "/.well-known/est"
#: The largest request body (a CSR with an RSA 4096 key is under 3 KiB).
MAX_BODY = 16 * 1024
REALM = b'Basic realm="relayd-est"'
PKCS10 = "application/pkcs10"
CERTS_ONLY = b"application/pkcs7-mime; smime-type=certs-only"
OPS = ("cacerts", "simpleenroll", "simplereenroll", "csrattrs")
_B64 = re.compile(rb"[A-Za-z0-9+/=\s]*\Z")


class EstError(Exception):
    """A refusal: HTTP status, a bounded reason (the metric's label) and a
    message for people."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def _unauthorized(reason: str) -> EstError:
    # One message for every OTP problem: no oracle.
    return EstError(401, reason, "enrollment needs a valid one-time passcode (Basic password, Bearer, or the "
                                 "CSR's challengePassword)")


def read_csr(content_type: bytes | None, body: bytes) -> x509.CertificateSigningRequest:
    """The CSR of an enroll request, checked: media type, base64 (with or
    without line breaks; PEM accepted), DER, signature, key type. EstError
    415 or 400."""
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    if media != PKCS10.encode():
        raise EstError(415, "media_type", f"send the CSR as {PKCS10} (base64 of the DER)")
    text = body.strip()
    if not text:
        raise EstError(400, "empty", "the body is empty")
    if text.startswith(b"-----BEGIN"):
        try:
            csr = x509.load_pem_x509_csr(text)
        except ValueError:
            raise EstError(400, "bad_csr", "the body is not a PKCS#10 certificate request") from None
    else:
        if not _B64.match(text):
            raise EstError(400, "bad_base64", "the body is not base64")
        try:
            der = base64.b64decode(b"".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise EstError(400, "bad_base64", "the body is not base64") from None
        try:
            csr = x509.load_der_x509_csr(der)
        except ValueError:
            raise EstError(400, "bad_csr", "the body is not a PKCS#10 certificate request") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise EstError(400, "bad_csr", "the certificate request's key or signature is unreadable") from None
    if not valid:
        raise EstError(400, "bad_signature", "the certificate request's signature does not verify")
    if not key_allowed(key, device=True):
        raise EstError(400, "bad_key", f"the key must be {DEVICE_KEYS}")
    return csr


def credential(authorization: bytes | None, csr: x509.CertificateSigningRequest | None) -> tuple[str | None, str]:
    """(the OTP, where it came from: basic, bearer, challenge) of an enroll
    request; (None, "missing") without one. Never raises for hostile
    input: whatever does not decode is no credential."""
    if authorization:
        # A header that carries no usable OTP is passed over, as a missing
        # one is: the CSR's challengePassword may still hold it.
        scheme, _, rest = authorization.strip().partition(b" ")
        scheme = scheme.lower()
        rest = rest.strip()
        if scheme == b"basic":
            try:
                _, colon, password = base64.b64decode(rest, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                colon = password = ""
            if colon and password:
                return password, "basic"
        elif scheme == b"bearer" and rest and rest.isascii():
            return rest.decode("ascii"), "bearer"
    if csr is not None:
        try:
            value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
        except (x509.AttributeNotFound, ValueError):
            return None, "missing"
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            return None, "missing"
        return (text, "challenge") if text else (None, "missing")
    return None, "missing"


def certs_only(certs: list[x509.Certificate]) -> bytes:
    """A certs-only CMS SignedData (no signers) of ``certs``, as one
    unbroken base64 line."""
    return base64.b64encode(pkcs7.serialize_certificates(certs, serialization.Encoding.DER))


def parse_path(path: str) -> str | None:
    """The operation of an EST path, or None (not offered: labels too)."""
    if not path.startswith(PREFIX + "/"):
        return None
    op = path[len(PREFIX) + 1:]
    return op if op in OPS else None


class EstServer:
    """The EST operations over the relay's CA, store and OTPs
    (relayd.control.provisioning.Otps). ``cert_ttl``: seconds."""

    def __init__(self, store, ca, otps, cert_ttl: float) -> None:
        self.store = store
        self.ca = ca
        self.otps = otps
        self.cert_ttl = cert_ttl

    def handle(self, method: str, path: str, head, body: bytes, client: str, peer_der: bytes | None) -> http1.Reply:
        op = parse_path(path.partition("?")[0])
        label = op or "-"
        try:
            if op is None:
                raise EstError(404, "no_such_op", "this relay offers cacerts, simpleenroll, simplereenroll and "
                                                  "csrattrs under /.well-known/est/ (no CA labels)")
            want = "POST" if op in ("simpleenroll", "simplereenroll") else "GET"
            if method != want and not (want == "GET" and method == "HEAD"):
                raise EstError(405, "method", f"{op} takes {want}")
            if op == "cacerts":
                reply = self._reply(certs_only([self.ca.certificate]))
            elif op == "csrattrs":
                reply = http1.Reply(204)
            elif op == "simpleenroll":
                reply = self._enroll(head, body, client)
            else:
                reply = self._reenroll(head, body, client, peer_der)
        except EstError as exc:
            return self.refuse(label, method, client, exc)
        except Exception as exc:  # a bug or the database: this request only
            caught("est", exc, op=label)
            return self.refuse(label, method, client, EstError(503, "failed", "the relay failed; try again"))
        metrics.EST_REQUESTS.labels(label, str(reply.status)).inc()
        return reply

    def refuse(self, op: str, method: str, client: str, exc: EstError) -> http1.Reply:
        metrics.EST_REQUESTS.labels(op, str(exc.status)).inc()
        metrics.BAD_INPUT.labels("est", exc.reason).inc()
        # One budget per reason (a bounded set): a flood of one kind cannot hide another.
        _LOG.log(logging.WARNING if exc.status >= 500 else logging.INFO, "est request refused: " + exc.reason,
                 extra={"op": op, "status": exc.status, "reason": exc.reason, "client": client})
        headers = [(b"Allow", b"POST" if op.endswith("enroll") else b"GET, HEAD")] if exc.status == 405 else []
        if exc.status == 401:
            headers.append((b"WWW-Authenticate", REALM))
        return http1.Reply(exc.status, str(exc).encode() + b"\n", b"text/plain; charset=utf-8", tuple(headers))

    def too_large(self, head, ex) -> http1.Reply:
        op = parse_path(head.path.decode("latin-1")) or "-"
        return self.refuse(op, head.method.decode("latin-1"), ex.client[0],
                           EstError(413, "too_large", f"the body is over {MAX_BODY // 1024} KiB"))

    @staticmethod
    def _reply(b64: bytes) -> http1.Reply:
        return http1.Reply(200, b64, CERTS_ONLY, ((b"Content-Transfer-Encoding", b"base64"),))

    def _sign(self, csr, device_id: str) -> tuple[x509.Certificate, dict]:
        pem = self.ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), device_id,
                                     days=self.cert_ttl / 86400, device=True)
        return x509.load_pem_x509_certificate(pem), cert_info(pem)

    def _enroll(self, head, body: bytes, client: str) -> http1.Reply:
        csr = read_csr(head.get(b"content-type"), body)
        otp, how = credential(head.get(b"authorization"), csr)
        if otp is None:
            raise _unauthorized("no_otp")
        row = self.otps.usable(otp)
        if row is None:
            raise _unauthorized("bad_otp")
        device_id = "dv-" + secrets.token_hex(6)
        cert, info = self._sign(csr, device_id)
        if not self.otps.redeem(otp, device_id, row["device_name"] or device_id, row["labels"], info["serial"],
                                info["not_after"].timestamp()):
            raise _unauthorized("bad_otp")  # spent by a concurrent enrollment, or it died meanwhile
        metrics.ENROLLMENTS.labels("est_enroll", "success").inc()
        log.info("device enrolled over EST", extra={"device": device_id, "otp_id": row["otp_id"], "via": how,
                                                    "client": client})
        return self._reply(certs_only([cert]))

    def _reenroll(self, head, body: bytes, client: str, peer_der: bytes | None) -> http1.Reply:
        if not peer_der:
            raise EstError(401, "no_cert", "re-enrollment needs the current certificate as the TLS client certificate")
        try:
            current = x509.load_der_x509_certificate(peer_der)
        except ValueError:
            raise EstError(401, "bad_cert", "the client certificate does not parse") from None
        if not self.ca.issued(current):  # a zero-trust user's certificate verifies on this port too
            raise EstError(401, "bad_cert", "the client certificate is not one of this relay's devices")
        info = cert_info(peer_der)
        device_id = info.get("agent_id") or info.get("common_name")
        if not device_id or self.store.is_revoked(device_id, info["serial"]):
            raise EstError(403, "revoked", "this certificate is revoked")
        csr = read_csr(head.get(b"content-type"), body)
        is_device = bool(self.store.query("SELECT 1 FROM dc_devices WHERE id = ?", (device_id,)))
        try:
            pem = self.ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), device_id,
                                         days=self.cert_ttl / 86400, device=is_device)
        except AuthError:  # an agent of a join token keeps its key types
            raise EstError(400, "bad_key", "the key must be ECDSA P-256 or Ed25519") from None
        new = cert_info(pem)
        try:
            self.store.update_agent_cert(device_id, new["serial"], new["not_after"].timestamp())
        except RevokedError:
            raise EstError(403, "revoked", "this device is revoked") from None
        metrics.ENROLLMENTS.labels("est_renew", "success").inc()
        log.info("device certificate renewed over EST", extra={"device": device_id, "client": client})
        return self._reply(certs_only([x509.load_pem_x509_certificate(pem)]))
