"""The device gateway (issue 13 item 6; ../shared/specs/device-cloud.md
section 7.6): device tokens, and the ``/api/v1/device/...`` routes a device
calls toward the cloud.

Theory of operation
-------------------
A device is an agent with a ``dc_devices`` row. When its tunnel comes up,
and again at half-life, the relay pushes it a device token on a control
stream (relayd.gateway.devicegw): a compact JWS (relayd.control.jws, type
``relayd-device+jwt``, Ed25519) whose ``sub`` is the device id, ``aud``
``relayd-device-gateway``, 15 minutes of life. The signing key sits in the
data directory (``device-signing.key``, 0600), made at the first start; its
public half verifies the tokens here.

A device route authenticates its caller in one of three ways, all through
``DeviceGateway.authenticate``:

* ``Authorization: Bearer <device token>``, anywhere on the HTTPS port;
* the device's own client certificate (the relay's agent CA), presented on
  the HTTPS port without a token;
* the agent's local forwarder (relayd.agent.deviceapi): the call arrives
  over the device's own tunnel with the token the relay pushed it, and the
  token's subject must be that tunnel's device.

Whichever way, the device must still have its row and an unrevoked agent.
Refusals are counted in ``relayd_device_api_refusals_total{reason}`` and
logged by the API's dispatcher (route, status, error code, client): never a
token or a body. A device's calls are limited by a token bucket per device
(429 with ``Retry-After``); a body is at most 64 KiB (413).

``POST /api/v1/device/notifications`` checks the notification and publishes
``device.notification`` on the event bus (relayd.control.events), where the
webhooks (relayd.control.webhooks) and later push senders take it.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd import metrics
from relayd.control import jws
from relayd.control.api import JSON, ApiError, Op, Request, ok, parse_rfc3339, rfc3339
from relayd.control.ca import cert_info, write_private
from relayd.control.events import DEVICE_NOTIFICATION, Event
from relayd.errors import ConfigError

KEY_FILE = "device-signing.key"
AUDIENCE = "relayd-device-gateway"
TOKEN_TTL = 15 * 60
#: The largest body of a device call.
MAX_BODY = 64 * 1024
#: The bytes of a body one control message carries (the agent's local
#: forwarder, relayd.gateway.devicegw: a control message is at most 64 KiB).
CHUNK = 32 * 1024
#: Each device's calls: a bucket of BURST, refilled at RATE per second.
RATE, BURST = 5.0, 20.0
#: Clock skew allowed on a token's times (the relay made it: small).
SKEW = 30


def load_or_create_key(data: Path, name: str = KEY_FILE) -> Ed25519PrivateKey:
    """The data directory's device signing key (or another Ed25519 key of
    the data directory: ``name``), made at the first start."""
    path = data / name
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return key
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


class DeviceTokens:
    """Device tokens: made for the relay's pushes, checked at the gateway."""

    def __init__(self, key: Ed25519PrivateKey, issuer: str = "relayd", ttl: int = TOKEN_TTL) -> None:
        self.key = key
        self.issuer = issuer
        self.ttl = ttl
        self.keys = {jws.key_id(key.public_key()): key.public_key()}

    def issue(self, device_id: str, now: float | None = None) -> tuple[str, int]:
        """(token, expiry in seconds since the epoch)."""
        now = int(now if now is not None else time.time())
        exp = now + self.ttl
        claims = {"iss": self.issuer, "aud": AUDIENCE, "sub": device_id, "iat": now, "nbf": now, "exp": exp,
                  "jti": secrets.token_urlsafe(12)}
        return jws.sign(claims, jws.DEVICE, self.key), exp

    def verify(self, token: str, now: float | None = None) -> str:
        """The device id of a good token; jws.TokenError (``reason``) if not."""
        claims = jws.verify(token, jws.DEVICE, self.keys)
        if claims.get("aud") != AUDIENCE or claims.get("iss") != self.issuer:
            raise jws.TokenError("audience", "the token is not for the device gateway")
        jws.check_window(claims, time.time() if now is None else now, before=SKEW, after=0)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= 128:
            raise jws.TokenError("json", "the token names no device")
        return sub


@dataclass(frozen=True)
class Caller:
    """Who a device route's credential proved to be, and how."""

    device_id: str
    via: str  # token, cert, link


class RateLimiter:
    """A token bucket per key; thread safe (handlers run in worker threads).
    Buckets that are full again are forgotten, so the table stays bounded
    by the keys active in the last BURST / RATE seconds."""

    def __init__(self, rate: float = RATE, burst: float = BURST, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if allowed; else the seconds until a call would be."""
        now = self.clock()
        with self._lock:
            level, at = self._buckets.get(key, (self.burst, now))
            level = min(self.burst, level + (now - at) * self.rate)
            if level < 1:
                self._buckets[key] = (level, now)
                return (1 - level) / self.rate
            self._buckets[key] = (level - 1, now)
            if len(self._buckets) > 10_000:
                full = [k for k, (lv, t) in self._buckets.items() if lv + (now - t) * self.rate >= self.burst]
                for k in full:
                    del self._buckets[k]
            return 0.0


_SEVERITIES = ("info", "warning", "critical")
NOTIFICATION_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["type"],
    "properties": {
        "type": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$",
                 "description": "what happened, such as motion: letters, digits, dot, dash, underscore"},
        "severity": {"enum": list(_SEVERITIES), "description": "info (the default), warning or critical"},
        "title": {"type": "string", "maxLength": 256},
        "message": {"type": "string", "maxLength": 4096},
        "time": {"type": "string", "maxLength": 64, "description": "when it happened, RFC 3339 (default: now)"},
        "data": {"type": "object", "description": "anything else, passed on as it is"},
    }}
SCHEMAS = {
    "Notification": NOTIFICATION_SCHEMA,
    "Accepted": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
}
TAG = "device gateway"


class DeviceGateway:
    """The device routes of the REST API. ``db`` is the Store (handlers run
    in worker threads), ``ca`` the relay's CertificateAuthority, ``bus``
    the event bus."""

    def __init__(self, store, ca, tokens: DeviceTokens, bus, limiter: RateLimiter | None = None) -> None:
        self.store = store
        self.ca = ca
        self.tokens = tokens
        self.bus = bus
        self.limiter = limiter or RateLimiter()

    # -- who is calling ----------------------------------------------------------------------

    def authenticate(self, head, cred: dict) -> Caller:
        """The calling device, from a bearer token, the TLS client
        certificate (``cred["cert"]``, DER) or the tunnel it came through
        (``cred["link"]``, its device id, with the token the relay gave it).
        ApiError 401 otherwise."""
        v = head.get(b"authorization")
        link = cred.get("link")
        if v is not None:
            if v[:7].lower() != b"bearer " or not v[7:].strip():
                self._refuse("malformed", "send Authorization: Bearer <device token>")
            try:
                device = self.tokens.verify(v[7:].strip().decode("latin-1"))
            except jws.TokenError as exc:
                self._refuse(exc.reason, "the device token is not valid")
            if link is not None and device != link:
                self._refuse("other_device", "the device token is not this tunnel's device")
            via = "link" if link is not None else "token"
        elif cred.get("cert"):
            device = self._from_cert(cred["cert"])
            via = "cert"
        else:
            self._refuse("missing", "this route needs Authorization: Bearer <device token> or the device's certificate")
        if not self._enrolled(device):
            self._refuse("unknown_device", "no such device, or it is revoked")
        return Caller(device, via)

    def _from_cert(self, der: bytes) -> str:
        from cryptography import x509

        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            self._refuse("bad_cert", "the client certificate does not parse")
        if not self.ca.issued(cert):  # a user's certificate (zero-trust CA) proves no device
            self._refuse("bad_cert", "the client certificate is not a device's")
        info = cert_info(der)
        device = info.get("agent_id") or info.get("common_name")
        if not device or self.store.is_revoked(device, info["serial"]):
            self._refuse("revoked", "the device's certificate is revoked")
        return device

    def _enrolled(self, device: str) -> bool:
        rows = self.store.query("SELECT a.revoked_at FROM dc_devices d JOIN agents a ON a.id = d.id WHERE d.id = ?",
                                (device,))
        return bool(rows) and rows[0][0] is None

    @staticmethod
    def _refuse(reason: str, message: str):
        metrics.DEVICE_API_REFUSALS.labels(reason).inc()
        raise ApiError(401, "unauthorized", message,
                       ((b"WWW-Authenticate", b'Bearer realm="relayd-device", error="invalid_token"'),))

    def admit(self, caller: Caller, body: bytes) -> None:
        """Size, then rate: 413, 429."""
        if len(body) > MAX_BODY:
            metrics.DEVICE_API_REFUSALS.labels("too_large").inc()
            raise ApiError(413, "too_large", f"the body is over {MAX_BODY // 1024} KiB")
        wait = self.limiter.take(caller.device_id)
        if wait:
            metrics.DEVICE_API_REFUSALS.labels("rate").inc()
            raise ApiError(429, "too_many_requests", "this device calls too often; slow down",
                           ((b"Retry-After", str(max(1, math.ceil(wait))).encode()),))

    # -- routes ------------------------------------------------------------------------------------

    def ops(self) -> list[Op]:
        return [Op("POST", "/device/notifications", self.notify, "postDeviceNotification",
                   "A device posts a notification", TAG, body={"$ref": "#/components/schemas/Notification"},
                   responses={202: ("Accepted: published to the event bus", {"$ref": "#/components/schemas/Accepted"},
                                    (JSON,))},
                   errors=(401, 413, 429), auth=self.authenticate, admit=self.admit, security="deviceToken",
                   description="Takes the device token the relay pushed the device (or the device's client "
                               "certificate, or the agent's local forwarder). Published as "
                               "device.notification to webhooks and push senders.")]

    def notify(self, req: Request) -> object:
        caller: Caller = req.principal
        doc = req.body
        at = parse_rfc3339(doc["time"], "body.time") if "time" in doc else time.time()
        data = {"type": doc["type"], "severity": doc.get("severity", "info"), "title": doc.get("title", ""),
                "message": doc.get("message", ""), "time": rfc3339(at), "data": doc.get("data", {})}
        event = Event(DEVICE_NOTIFICATION, caller.device_id, data)
        self.bus.publish(event)
        metrics.DEVICE_NOTIFICATIONS.labels(caller.via).inc()
        req.target = caller.device_id
        return ok({"id": event.id}, 202)
