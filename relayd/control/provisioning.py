"""Device provisioning, admin side (issue 13 item 1; ../shared/specs/
device-cloud.md 7.1): one-time passcodes (OTPs) that enroll one device each
over EST (relayd.control.est).

Theory of operation
-------------------
An OTP is 128 random bits written as 26 Crockford base32 characters: easy
to read aloud and type into a device's settings, and the decoding forgives
what people do to such codes (lower case, hyphens, O for 0, I or L for 1).
The store keeps only the SHA-256 of its canonical form (``dc_otps``), with
the device's future name and labels, its expiry (24 hours by default, 7 days
at most) and who made it. The code itself is shown once, to the admin who
asked for it, together with what the device needs to trust the relay before
it sends the code: the EST URL and the SHA-256 pin of the relay's CA, as a
join token carries them.

``redeem`` spends an OTP and records the device in one transaction: the
``UPDATE ... WHERE used_at IS NULL`` that marks it used is the one place
that decides, so two enrollments racing with the same code get one
certificate between them; a failure after it (a full disk) rolls the spend
back with the rest. An unknown, used, revoked and expired OTP are one answer
to the caller (``None``): the EST server must not tell them apart.

The admin routes take the admin key as ``Authorization: Bearer <key>`` or,
for NVIDIA's scripts, ``Authorization: PROV-ADMIN <key>``; when the
configuration names ``admin_allow`` networks, a caller from anywhere else
gets 403 before its key is looked at. NVIDIA's ``GET /admin/api/otp`` and
``GET /api/otp`` answer the bare code (text/plain, no newline), or the JSON
of ``POST /api/v1/admin/otps`` to ``Accept: application/json``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import secrets
import time

import orjson

from relayd import metrics
from relayd.control import crockford
from relayd.control.api import JSON, ApiError, Op, Request, audit_log, listing, no_content, not_found, ok, rfc3339
from relayd.core import http1
from relayd.errors import ConfigError
from relayd.log import RateLimitedLog

_LOG = RateLimitedLog(logging.getLogger("relayd.provisioning"))

DEFAULT_TTL = 24 * 3600
MAX_TTL = 7 * 24 * 3600
OTP_LENGTH = 26
ADMIN_REALM = b'Bearer realm="relayd", PROV-ADMIN realm="relayd"'
#: OTP requests per admin client: a bucket of BURST refilled at RATE a second.
RATE, BURST = 2.0, 60.0
TAG = "provisioning"
#: NVIDIA's OTP paths (its provisioning server's, and its gateway's).
NVIDIA_PATHS = ("/admin/api/otp", "/api/otp")
#: The most OTPs one POST /admin/otps/batch makes.
MAX_BATCH = 1000


def new_otp() -> str:
    """128 random bits as 26 Crockford base32 characters."""
    return crockford.encode(secrets.randbits(128), OTP_LENGTH)


def canonical(text: str) -> str | None:
    """An OTP as typed, in its one spelling (upper case, no hyphens or
    spaces, O/I/L read as 0/1); None if it cannot be one."""
    return crockford.normalize(text, OTP_LENGTH)


def otp_hash(text: str) -> str | None:
    c = canonical(text)
    return None if c is None else hashlib.sha256(c.encode()).hexdigest()


def parse_ttl(v) -> float:
    """A lifetime: seconds, or a duration such as ``24h``; at most 7 days."""
    from relayd.config import parse_duration

    if isinstance(v, bool):
        raise ConfigError("ttl: a duration such as 24h, or seconds")
    ttl = float(v) if isinstance(v, (int, float)) else parse_duration(v, "ttl")
    if not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL):
        raise ConfigError("ttl: more than 0 and at most 7d")
    return ttl


def client_in(client: str, networks: tuple) -> bool:
    try:
        addr = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == n.version and addr in n for n in networks)


_COLUMNS = "id, device_name, labels, created_at, expires_at, used_at, revoked_at, device_id, actor"


def _row(r: tuple, now: float) -> dict:
    d = dict(zip(("otp_id", "device_name", "labels", "created_at", "expires_at", "used_at", "revoked_at",
                  "device_id", "actor"), r))
    d["labels"] = orjson.loads(d["labels"] or "{}")
    d["state"] = ("used" if d["used_at"] is not None else "revoked" if d["revoked_at"] is not None
                  else "expired" if d["expires_at"] <= now else "pending")
    return d


class Otps:
    """The OTPs of a Store (the same database; its ``transaction`` and
    ``query``)."""

    def __init__(self, store) -> None:
        self.store = store

    def create(self, device_name: str | None = None, ttl: float = DEFAULT_TTL, labels: dict | None = None,
               actor: str = "api", now: float | None = None) -> tuple[dict, str]:
        """A new OTP: (its row, the code; shown this once)."""
        return self.create_many([device_name], ttl, labels, actor, now)[0]

    def create_many(self, device_names: list, ttl: float = DEFAULT_TTL, labels: dict | None = None,
                    actor: str = "api", now: float | None = None) -> list[tuple[dict, str]]:
        """One new OTP for each of ``device_names`` (None: named by its id
        later), in one transaction: [(row, code)]."""
        now = time.time() if now is None else now
        ttl = parse_ttl(ttl)
        made = [("otp-" + secrets.token_hex(6), name, new_otp()) for name in device_names]
        with self.store.transaction() as db:
            # Spent and dead codes are kept a week for the record, then go.
            db.execute("DELETE FROM dc_otps WHERE expires_at < ?", (now - MAX_TTL,))
            db.executemany(f"INSERT INTO dc_otps ({_COLUMNS}, otp_sha256)"
                           " VALUES (?, ?, ?, ?, ?, NULL, NULL, NULL, ?, ?)",
                           [(otp_id, name, orjson.dumps(labels or {}).decode(), now, now + ttl, actor, otp_hash(code))
                            for otp_id, name, code in made])
        return [(self.get(otp_id, now), code) for otp_id, _, code in made]

    def get(self, otp_id: str, now: float | None = None) -> dict | None:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM dc_otps WHERE id = ?", (otp_id,))
        return _row(rows[0], time.time() if now is None else now) if rows else None

    def list(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        return [_row(r, now) for r in self.store.query(f"SELECT {_COLUMNS} FROM dc_otps ORDER BY created_at, id")]

    def revoke(self, otp_id: str) -> bool | None:
        """True if revoked now (or already), False if it was used, None if unknown."""
        with self.store.transaction() as db:
            row = db.execute("SELECT used_at FROM dc_otps WHERE id = ?", (otp_id,)).fetchone()
            if row is None:
                return None
            if row[0] is not None:
                return False
            db.execute("UPDATE dc_otps SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (time.time(), otp_id))
        return True

    def usable(self, code: str, now: float | None = None) -> dict | None:
        """The row of an OTP that could enroll a device now; None for an
        unknown, used, revoked or expired one (one answer for all)."""
        h = otp_hash(code)
        if h is None:
            return None
        rows = self.store.query(f"SELECT {_COLUMNS} FROM dc_otps WHERE otp_sha256 = ?", (h,))
        if not rows:
            return None
        row = _row(rows[0], time.time() if now is None else now)
        return row if row["state"] == "pending" else None

    def redeem(self, code: str, device_id: str, name: str, labels: dict, cert_serial: int,
               cert_not_after: float, now: float | None = None) -> bool:
        """Spend the OTP and record the device (an agent row, its
        certificate, a dc_devices row) in one transaction; False (nothing
        written) if another enrollment spent it first or it died meanwhile."""
        from relayd.control.store import Store, _serial_text

        now = time.time() if now is None else now
        h = otp_hash(code)
        with self.store.transaction() as db:
            cur = db.execute("UPDATE dc_otps SET used_at = ?, device_id = ? WHERE otp_sha256 = ? AND used_at IS NULL"
                             " AND revoked_at IS NULL AND expires_at > ?", (now, device_id, h, now))
            if cur.rowcount != 1:
                return False
            Store._insert_agent(db, device_id, "[]", _serial_text(cert_serial), cert_not_after, now)
            db.execute("INSERT INTO dc_devices (id, name, labels, created_at) VALUES (?, ?, ?, ?)",
                       (device_id, name, orjson.dumps(labels or {}).decode(), now))
            Store._bump(db)
        return True


# -- the admin routes --------------------------------------------------------------------------

_LABELS = {"type": "object", "maxProperties": 32, "additionalProperties": {"type": "string", "maxLength": 256},
           "description": "labels the device gets (at most 32; values up to 256 characters)"}
SCHEMAS = {
    "OtpRequest": {"type": "object", "additionalProperties": False, "properties": {
        "device_name": {"type": "string", "minLength": 1, "maxLength": 128,
                        "description": "the device's name (default: its id)"},
        "ttl": {"type": ["string", "integer"], "description": "lifetime: a duration such as 24h (default), at most 7d"},
        "labels": _LABELS}},
    "OtpBatchRequest": {"type": "object", "additionalProperties": False, "required": ["count"], "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH},
        "device_name_prefix": {"type": "string", "minLength": 1, "maxLength": 64,
                               "description": "names the devices PREFIX1, PREFIX2, ... (zero-padded; default: "
                                              "each device's id)"},
        "ttl": {"type": ["string", "integer"], "description": "lifetime: a duration such as 24h (default), at most 7d"},
        "labels": _LABELS}},
    "Otp": {"type": "object", "required": ["otp_id", "otp", "expires_at", "est_url", "ca_sha256"], "properties": {
        "otp_id": {"type": "string"}, "otp": {"type": "string", "description": "the code: shown this once"},
        "expires_at": {"type": "string"},
        "est_url": {"type": ["string", "null"], "description": "null: the relay has no HTTPS port (yet)"},
        "ca_sha256": {"type": "string", "description": "SHA-256 of the relay CA certificate (DER), hex"},
        "device_name": {"type": ["string", "null"]}, "labels": {"type": "object"}}},
    "OtpInfo": {"type": "object", "properties": {
        "otp_id": {"type": "string"}, "device_name": {"type": ["string", "null"]}, "labels": {"type": "object"},
        "state": {"enum": ["pending", "used", "expired", "revoked"]}, "created_at": {"type": "string"},
        "expires_at": {"type": "string"}, "used_at": {"type": ["string", "null"]},
        "revoked_at": {"type": ["string", "null"]}, "device_id": {"type": ["string", "null"]}}},
}
_ID = {"type": "string", "pattern": "^otp-[0-9a-f]{12}$", "description": "an OTP id (otp-...)"}


class Provisioning:
    """The OTP routes. ``key_ok`` checks an admin key, ``est_url()`` is the
    EST base URL devices use, ``pin`` the CA pin (``sha256:<hex>``),
    ``allow`` the admin networks (empty: anywhere)."""

    def __init__(self, otps: Otps, key_ok, est_url, pin: str, allow: tuple = ()) -> None:
        from relayd.control.devicegw import RateLimiter

        self.otps = otps
        self.key_ok = key_ok
        self.est_url = est_url
        self.pin = pin
        self.allow = allow
        self.limiter = RateLimiter(RATE, BURST)

    def admin(self, head, client: str) -> None:
        """The admin key (Bearer or PROV-ADMIN) from an allowed network;
        ApiError 403 / 401 / 429."""
        if self.allow and not client_in(client, self.allow):
            metrics.BAD_INPUT.labels("provisioning", "network").inc()
            raise ApiError(403, "forbidden", "OTPs are issued to the admin networks only")
        v = head.get(b"authorization") or b""
        scheme, _, key = v.partition(b" ")
        if scheme.lower() not in (b"bearer", b"prov-admin") or not key.strip():
            metrics.BAD_INPUT.labels("provisioning", "no_key").inc()
            raise ApiError(401, "unauthorized", "this route needs Authorization: Bearer <admin key> "
                                                "(or PROV-ADMIN <admin key>)", ((b"WWW-Authenticate", ADMIN_REALM),))
        if not self.key_ok(key.strip().decode("latin-1")):
            metrics.BAD_INPUT.labels("provisioning", "bad_key").inc()
            raise ApiError(401, "unauthorized", "wrong admin key", ((b"WWW-Authenticate", ADMIN_REALM),))
        wait = self.limiter.take(client)
        if wait:
            metrics.BAD_INPUT.labels("provisioning", "rate").inc()
            raise ApiError(429, "too_many_requests", "too many OTP requests; slow down",
                           ((b"Retry-After", str(max(1, math.ceil(wait))).encode()),))

    def _auth(self, head, cred: dict):
        self.admin(head, cred.get("client", ""))
        return "admin"

    def issue(self, body: dict, actor: str) -> dict:
        return self.issue_many(body, actor, [body.get("device_name")])[0]

    def issue_many(self, body: dict, actor: str, names: list) -> list[dict]:
        if len(body.get("labels") or {}) > 32:
            raise ConfigError("body.labels: at most 32 labels")
        made = self.otps.create_many(names, parse_ttl(body.get("ttl", DEFAULT_TTL)), body.get("labels"), actor)
        est_url, pin = self.est_url(), self.pin.removeprefix("sha256:")
        return [{"otp_id": row["otp_id"], "otp": code, "expires_at": rfc3339(row["expires_at"]), "est_url": est_url,
                 "ca_sha256": pin, "device_name": row["device_name"], "labels": row["labels"]} for row, code in made]

    def ops(self) -> list[Op]:
        common = dict(tag=TAG, auth=self._auth, security="adminKey", errors=(401, 403, 429))
        return [
            Op("POST", "/admin/otps", self._post, "createOtp", "Issue a provisioning OTP for one device",
               body={"$ref": "#/components/schemas/OtpRequest"}, write=True,
               responses={201: ("The OTP: shown this once", {"$ref": "#/components/schemas/Otp"}, (JSON,))},
               description="Admin key as Bearer or PROV-ADMIN. The code enrolls one device over EST "
                           "(/.well-known/est/simpleenroll) before it expires.", **common),
            Op("POST", "/admin/otps/batch", self._post_batch, "createOtps", "Issue OTPs for many devices at once",
               body={"$ref": "#/components/schemas/OtpBatchRequest"}, write=True,
               responses={201: ("The OTPs: shown this once", listing({"$ref": "#/components/schemas/Otp"}),
                                (JSON,))},
               description=f"Up to {MAX_BATCH} OTPs in one request (one transaction; one request of the "
                           "admin client's rate limit), for provisioning a fleet.", **common),
            Op("GET", "/admin/otps", self._list, "listOtps", "List OTPs (never the codes)",
               responses={200: ("The OTPs", listing({"$ref": "#/components/schemas/OtpInfo"}),
                                (JSON,))}, **common),
            Op("DELETE", "/admin/otps/{otp_id}", self._delete, "revokeOtp", "Revoke an unused OTP",
               params={"otp_id": _ID}, write=True, responses={204: ("Revoked", None, ())}, **common),
        ]

    def _post(self, req: Request):
        doc = self.issue(req.body or {}, req.actor)
        req.target = doc["otp_id"]
        metrics.OTPS_ISSUED.labels(req.actor).inc()
        return ok(doc, 201)

    def _post_batch(self, req: Request):
        body = req.body
        prefix, n = body.get("device_name_prefix"), body["count"]
        names = [f"{prefix}{i:0{len(str(n))}d}" if prefix else None for i in range(1, n + 1)]
        items = self.issue_many(body, req.actor, names)
        req.target = f"{n} OTPs"
        metrics.OTPS_ISSUED.labels(req.actor).inc(n)
        return ok({"items": items}, 201)

    def _list(self, req: Request):
        return ok({"items": [_info(r) for r in self.otps.list()]})

    def _delete(self, req: Request):
        done = self.otps.revoke(req.params["otp_id"])
        if done is None:
            raise not_found("OTP")
        if done is False:
            raise ApiError(409, "already_used", "this OTP enrolled a device already: revoke the device instead")
        return no_content()

    def nvidia(self, method: str, head, client: str) -> http1.Reply:
        """``GET /admin/api/otp`` and ``GET /api/otp``: the bare code, or
        JSON to ``Accept: application/json``."""
        try:
            # GET only: each call makes an OTP, and a HEAD would make one nobody sees.
            if method != "GET":
                raise ApiError(405, "method_not_allowed", "this route takes GET", ((b"Allow", b"GET"),))
            self.admin(head, client)
            doc = self.issue({}, "prov-admin")
        except ApiError as exc:
            _LOG.info("otp request refused", extra={"route": "/admin/api/otp", "status": exc.status,
                                                    "error": exc.code, "client": client})
            return http1.error_reply(exc.status, exc.code, str(exc), exc.headers)
        except ConfigError as exc:  # not expected without a body; the same answer as the API's
            return http1.error_reply(422, "invalid", str(exc))
        metrics.OTPS_ISSUED.labels("prov-admin").inc()
        audit_log.info("admin api write", extra={"actor": "prov-admin", "action": "createOtp", "target": doc["otp_id"],
                                                 "client": client, "status": 200})
        if JSON in (head.get(b"accept") or b"").decode("latin-1"):
            return ok(doc, 200, ((b"Cache-Control", b"no-store"),))
        return http1.Reply(200, doc["otp"].encode(), b"text/plain; charset=utf-8", ((b"Cache-Control", b"no-store"),))


def _info(r: dict) -> dict:
    return {"otp_id": r["otp_id"], "device_name": r["device_name"], "labels": r["labels"], "state": r["state"],
            "created_at": rfc3339(r["created_at"]), "expires_at": rfc3339(r["expires_at"]),
            "used_at": rfc3339(r["used_at"]), "revoked_at": rfc3339(r["revoked_at"]), "device_id": r["device_id"]}
