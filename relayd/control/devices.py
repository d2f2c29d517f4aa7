"""The device registry's users, claim codes and the user REST API (issue 13
items 3-4; ../shared/specs/device-cloud.md sections 7.3-7.5).

Theory of operation
-------------------
A device is an agent with a ``dc_devices`` row (``Store.register_device``,
or enrollment over EST); its id is the agent id. The registry is that row
(name, labels, owner, claim-code hash) joined with the agent's (certificate,
connected since, last seen, address, node): online means a tunnel is up.

Users. Every route of the user API authenticates through ``UserAuth`` (the
device API's one user-authentication function; the webhooks and the device
proxy take the same one). A user token is a JWS in ``Authorization``
(``Bearer`` prefix optional), either

* an OpenID Connect token (ID token, or an access token in JWT form) of a
  provider of ``[zerotrust.providers]``: signature by the provider's JWKS,
  ``iss``, ``aud`` = the provider's client id, ``exp``/``iat``
  (relayd.control.oidc), or
* a token of relayd's own user directory (the zero-trust controller's local
  users), got from ``POST /api/v1/users/token`` with the user's password
  (and one-time code if the user has one): EdDSA, type
  ``relayd-user+jwt``, ``aud`` ``relayd-device-api``, one hour; its key
  (``user-signing.key``) sits in the data directory.

The issuer picks the check (an issuer nobody configured is refused). The
user's profile (``dc_users``: one per issuer and subject) is made at the
first request that carries a good token.

Claim codes. When an unclaimed device's tunnel comes up the relay
(relayd.gateway.devicereg) pushes it its claim code: 80 bits, shown as
``XXXX-XXXX-XXXX-XXXX`` in Crockford base32. The code is the HMAC-SHA256
of the device id under a key of the data directory (``claim-code.key``),
cut to 80 bits: the same code every time until the device is claimed, so it
can be sent again at each reconnect while the database keeps only its
SHA-256. Claiming (``POST /api/v1/devices/claim``) finds the device by that
hash, wants it online and unclaimed (412/409), makes the caller its owner
and erases the hash; ten failed attempts of one user within a minute make
further ones 429 until the minute has passed.

Roles: ``owner`` (the claimer), and shares: ``admin`` (as the owner: edit,
delete, share), ``operator``, ``viewer`` (see; the device proxy lets
viewers GET/HEAD only). A device the caller cannot see is 404, whether it
exists or not; one they see with too weak a role is 403.

Refusals are counted (``relayd_user_auth_refusals_total{reason}``,
``relayd_device_claims_total{result}``, and every answer in
``relayd_api_requests_total``) and logged by the API's dispatcher: never a
token, a password or a code.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import secrets
import threading
import time
from pathlib import Path

import orjson

from relayd import metrics
from relayd.control import crockford, jws
from relayd.control.api import JSON, ApiError, Op, Request, listing, no_content, ok, rfc3339
from relayd.control.events import DEVICE_CLAIMED, DEVICE_DELETED, Event
from relayd.errors import AuthError, ConfigError

TAG = "devices"
USER_TOKEN = jws.USER
USER_AUDIENCE = "relayd-device-api"
USER_KEY_FILE = "user-signing.key"
USER_TOKEN_TTL = 3600
CLAIM_KEY_FILE = "claim-code.key"
#: Failed claims of one user within CLAIM_WINDOW seconds before 429.
CLAIM_FAILURES, CLAIM_WINDOW = 10, 60.0
ROLES = ("viewer", "operator", "admin")
_RANK = {"viewer": 1, "operator": 2, "admin": 3, "owner": 4}
MAX_TOKEN = 16 * 1024


# -- claim codes ------------------------------------------------------------------------------------

def load_or_create_secret(data: Path, name: str) -> bytes:
    """32 random bytes kept in the data directory (0600), made at the first start."""
    from relayd.control.ca import write_private

    path = data / name
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        write_private(path, key)
        return key
    if len(key) != 32:
        raise ConfigError(f"{path}: not a 32-byte key")
    return key


def claim_code(key: bytes, device_id: str) -> str:
    """The device's claim code: XXXX-XXXX-XXXX-XXXX (80 bits)."""
    mac = hmac.new(key, b"relayd claim code\0" + device_id.encode(), hashlib.sha256).digest()
    raw = crockford.encode_bytes(mac[:10])
    return "-".join(raw[i:i + 4] for i in range(0, 16, 4))


def normalize_code(text) -> str | None:
    """A code as people type it (any case, hyphens or spaces, I/L for 1, O
    for 0) in its canonical 16 characters; None if it cannot be one."""
    return crockford.normalize(text, 16)


def code_hash(code: str) -> str:
    """SHA-256 of a code's canonical form (what dc_devices keeps)."""
    return hashlib.sha256(normalize_code(code).encode()).hexdigest()


# -- the store's side ------------------------------------------------------------------------------

_DEVICE_SQL = (
    "SELECT d.id, d.name, d.labels, d.owner, d.claimed_at, d.created_at, a.connected_since, a.last_seen,"
    " a.node, a.address, a.cert_serial, a.cert_not_after, d.claim_sha256,"
    " CASE WHEN d.owner = ? THEN 'owner' ELSE (SELECT role FROM dc_shares s WHERE s.device_id = d.id"
    " AND s.user_id = ?) END FROM dc_devices d JOIN agents a ON a.id = d.id WHERE a.revoked_at IS NULL")


def _device(row: tuple) -> dict:
    return {"id": row[0], "name": row[1], "labels": orjson.loads(row[2]), "owner": row[3], "claimed_at": row[4],
            "created_at": row[5], "connected_since": row[6], "last_seen": row[7], "node": row[8],
            "remote_addr": row[9], "cert_serial": row[10], "cert_not_after": row[11], "claim_pending": bool(row[12]),
            "role": row[13]}


class DeviceStore:
    """dc_users, dc_devices and dc_shares over the node's Store: one short
    transaction per call."""

    def __init__(self, store) -> None:
        self.store = store

    def ensure_user(self, iss: str, sub: str, email: str | None, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        with self.store.transaction() as db:
            row = db.execute("SELECT id, email, created_at FROM dc_users WHERE iss = ? AND sub = ?",
                             (iss, sub)).fetchone()
            if row is None:
                uid = "usr_" + secrets.token_hex(8)
                db.execute("INSERT INTO dc_users (id, iss, sub, email, created_at) VALUES (?, ?, ?, ?, ?)",
                           (uid, iss, sub, email, now))
                row = (uid, email, now)
            elif email and email != row[1]:
                db.execute("UPDATE dc_users SET email = ? WHERE id = ?", (email, row[0]))
                row = (row[0], email, row[2])
        return {"id": row[0], "iss": iss, "sub": sub, "email": row[1], "created_at": row[2]}

    def user(self, user_id: str) -> dict | None:
        rows = self.store.query("SELECT id, iss, sub, email, created_at FROM dc_users WHERE id = ?", (user_id,))
        return dict(zip(("id", "iss", "sub", "email", "created_at"), rows[0])) if rows else None

    def visible(self, user_id: str) -> list[dict]:
        rows = self.store.query(_DEVICE_SQL + " AND (d.owner = ? OR EXISTS (SELECT 1 FROM dc_shares s WHERE"
                                " s.device_id = d.id AND s.user_id = ?)) ORDER BY d.created_at, d.id",
                                (user_id, user_id, user_id, user_id))
        return [_device(r) for r in rows]

    def device(self, device_id: str, user_id: str = "") -> dict | None:
        rows = self.store.query(_DEVICE_SQL + " AND d.id = ?", (user_id, user_id, device_id))
        return _device(rows[0]) if rows else None

    def link_info(self, device_id: str) -> tuple[bool, str | None, str | None] | None:
        """(claimed, claim hash) of a device, None if the agent is none."""
        rows = self.store.query("SELECT owner IS NOT NULL, claim_sha256 FROM dc_devices WHERE id = ?", (device_id,))
        return (bool(rows[0][0]), rows[0][1]) if rows else None

    def link_up(self, device_id: str, node: str, claim_sha256: str | None) -> None:
        """The tunnel is up on ``node``; the claim code's hash recorded if
        the device is unclaimed and has none yet."""
        with self.store.transaction() as db:
            db.execute("UPDATE agents SET node = ? WHERE id = ?", (node, device_id))
            if claim_sha256 is not None:
                db.execute("UPDATE dc_devices SET claim_sha256 = ? WHERE id = ? AND owner IS NULL"
                           " AND claim_sha256 IS NULL", (claim_sha256, device_id))

    def update(self, device_id: str, name: str | None, labels: dict | None) -> None:
        with self.store.transaction() as db:
            if name is not None:
                db.execute("UPDATE dc_devices SET name = ? WHERE id = ?", (name, device_id))
            if labels is not None:
                db.execute("UPDATE dc_devices SET labels = ? WHERE id = ?", (orjson.dumps(labels).decode(),
                                                                              device_id))

    def claim(self, claim_sha256: str, user_id: str, now: float | None = None) -> tuple[str, str | None]:
        """(result, device id): claimed, unknown_code, already_claimed, device_offline."""
        now = time.time() if now is None else now
        with self.store.transaction() as db:
            row = db.execute("SELECT d.id, d.owner, a.connected_since FROM dc_devices d JOIN agents a ON a.id = d.id"
                             " WHERE d.claim_sha256 = ? AND a.revoked_at IS NULL", (claim_sha256,)).fetchone()
            if row is None:
                return "unknown_code", None
            if row[1] is not None:
                return "already_claimed", row[0]
            if row[2] is None:
                return "device_offline", row[0]
            db.execute("UPDATE dc_devices SET owner = ?, claimed_at = ?, claim_sha256 = NULL WHERE id = ?",
                       (user_id, now, row[0]))
            db.execute("DELETE FROM dc_shares WHERE device_id = ?", (row[0],))
        return "claimed", row[0]

    def shares(self, device_id: str) -> list[dict]:
        rows = self.store.query("SELECT s.user_id, s.role, s.granted_at, u.email FROM dc_shares s JOIN dc_users u"
                                " ON u.id = s.user_id WHERE s.device_id = ? ORDER BY s.granted_at", (device_id,))
        return [{"user_id": r[0], "role": r[1], "granted_at": rfc3339(r[2]), "email": r[3]} for r in rows]

    def share(self, device_id: str, user_id: str, role: str) -> bool:
        """True if the share is new (False: its role changed)."""
        with self.store.transaction() as db:
            new = db.execute("SELECT 1 FROM dc_shares WHERE device_id = ? AND user_id = ?",
                             (device_id, user_id)).fetchone() is None
            db.execute("INSERT INTO dc_shares (device_id, user_id, role, granted_at) VALUES (?, ?, ?, ?)"
                       " ON CONFLICT(device_id, user_id) DO UPDATE SET role = excluded.role",
                       (device_id, user_id, role, time.time()))
        return new

    def unshare(self, device_id: str, user_id: str) -> bool:
        with self.store.transaction() as db:
            return db.execute("DELETE FROM dc_shares WHERE device_id = ? AND user_id = ?",
                              (device_id, user_id)).rowcount == 1


# -- user authentication --------------------------------------------------------------------------

def _refuse(reason: str, message: str) -> ApiError:
    metrics.USER_AUTH_REFUSALS.labels(reason).inc()
    return ApiError(401, "unauthorized", message,
                    ((b"WWW-Authenticate", b'Bearer realm="relayd", error="invalid_token"'),))


def _peek_issuer(token: str) -> str | None:
    """The unverified ``iss`` of a compact JWS (only to pick the check)."""
    try:
        part = token.split(".")[1]
        doc = orjson.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    iss = doc.get("iss") if isinstance(doc, dict) else None
    return iss if isinstance(iss, str) and 0 < len(iss) <= 512 else None


def _oidc_reason(message: str) -> str:
    for needle, reason in (("expired", "expired"), ("not for this client", "audience"), ("issuer", "issuer"),
                           ("signature", "signature"), ("does not publish", "unknown_key"),
                           ("algorithm", "algorithm")):
        if needle in message:
            return reason
    return "malformed"


class UserAuth:
    """``auth(head, cred) -> user id``: the device API's one
    user-authentication function (an Op's ``auth``). ``providers``: the
    OIDC providers (relayd.control.oidc.Provider) whose tokens are taken;
    ``key``: the Ed25519 key of relayd's own user tokens."""

    def __init__(self, users: DeviceStore, providers: dict, key, clock=time.time) -> None:
        self.users = users
        self.by_issuer = {p.issuer: p for p in providers.values()}
        self.key = key
        self.keys = {jws.key_id(key.public_key()): key.public_key()}
        self.issuer = "relayd:users:" + next(iter(self.keys))[:8]
        self.clock = clock

    def __call__(self, head, cred) -> str:
        return self.authenticate(head)["id"]

    def authenticate(self, head) -> dict:
        """The calling user's profile (made at the first good token)."""
        raw = head.get(b"authorization")
        if raw is None or not raw.strip():
            raise _refuse("missing", "this route needs Authorization: Bearer <user token>")
        v = raw.strip()
        if v[:7].lower() == b"bearer ":
            v = v[7:].strip()
        try:
            token = v.decode("ascii")
        except UnicodeDecodeError:
            token = ""
        if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
            raise _refuse("malformed", "the user token is not a compact JWS")
        iss = _peek_issuer(token)
        now = self.clock()
        email = None
        if iss is not None and iss == self.issuer:
            try:
                claims = jws.verify(token, USER_TOKEN, self.keys)
                if claims.get("aud") != USER_AUDIENCE or claims.get("iss") != self.issuer:
                    raise jws.TokenError("audience", "the token is not for the device API")
                jws.check_window(claims, now, before=30, after=0)
            except jws.TokenError as exc:
                raise _refuse(exc.reason, f"user token refused: {exc}") from None
            sub = claims.get("sub")
            email = claims.get("email")
        else:
            prov = self.by_issuer.get(iss)
            if prov is None:
                raise _refuse("issuer", "the token's issuer is not one this relay trusts")
            from relayd.control.oidc import ProviderError

            try:
                claims = prov.verify_token(token, now)
            except (ProviderError, ConfigError):
                metrics.USER_AUTH_REFUSALS.labels("provider_unavailable").inc()
                raise ApiError(503, "provider_unavailable", "the identity provider cannot be reached") from None
            except AuthError as exc:
                raise _refuse(_oidc_reason(str(exc)), f"user token refused: {exc}") from None
            sub = claims.get("sub")
            email = claims.get("email")
        if not isinstance(sub, str) or not 0 < len(sub) <= 255:
            raise _refuse("malformed", "the token names no subject")
        return self.users.ensure_user(iss, sub, email if isinstance(email, str) and len(email) <= 320 else None)

    def issue(self, username: str, email: str | None = None) -> tuple[str, int]:
        """A token of relayd's own directory for ``username``: (token, lifetime)."""
        now = int(self.clock())
        claims = {"iss": self.issuer, "aud": USER_AUDIENCE, "sub": username, "iat": now, "nbf": now,
                  "exp": now + USER_TOKEN_TTL, "jti": secrets.token_urlsafe(12)}
        if email:
            claims["email"] = email
        return jws.sign(claims, USER_TOKEN, self.key), USER_TOKEN_TTL


class ClaimLimiter:
    """Failed claims per user within a sliding minute."""

    def __init__(self, limit: int = CLAIM_FAILURES, window: float = CLAIM_WINDOW, clock=time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._fails: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def blocked(self, user: str) -> int:
        """Seconds until ``user`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            q = self._fails.get(user)
            while q and q[0] <= now - self.window:
                q.popleft()
            if not q:
                self._fails.pop(user, None)
                return 0
            return int(q[0] + self.window - now) + 1 if len(q) >= self.limit else 0

    def failed(self, user: str) -> None:
        with self._lock:
            if len(self._fails) > 100_000:  # bounded: the oldest users' windows go first
                self._fails.pop(next(iter(self._fails)))
            self._fails.setdefault(user, collections.deque()).append(self.clock())


# -- the routes -------------------------------------------------------------------------------------

_ID = {"type": "string", "minLength": 1, "maxLength": 128}
_LABELS = {"type": "object", "maxProperties": 32, "additionalProperties": {"type": "string", "maxLength": 256}}
SCHEMAS = {
    "UserProfile": {"type": "object", "required": ["id", "sub", "iss", "created_at"], "properties": {
        "id": {"type": "string"}, "sub": {"type": "string"}, "iss": {"type": "string"},
        "email": {"type": ["string", "null"]}, "created_at": {"type": "string", "format": "date-time"}}},
    "EdgeDevice": {"type": "object", "required": ["id", "name", "state", "claimed", "role"], "properties": {
        "id": {"type": "string"}, "name": {"type": "string"}, "labels": {"type": "object"},
        "state": {"enum": ["online", "offline"]}, "last_seen": {"type": ["string", "null"]},
        "claimed": {"type": "boolean"}, "role": {"enum": ["owner", *ROLES]},
        "owner": {"type": ["string", "null"]}, "node": {"type": ["string", "null"]},
        "remote_addr": {"type": ["string", "null"]}, "created_at": {"type": "string"},
        "certificate": {"type": "object", "properties": {"serial": {"type": "string"},
                                                         "not_after": {"type": "string"}}}}},
    "DevicePatch": {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 128}, "labels": _LABELS}},
    "ClaimRequest": {"type": "object", "additionalProperties": False, "required": ["claim_code"], "properties": {
        "claim_code": {"type": "string", "minLength": 1, "maxLength": 64,
                       "description": "XXXX-XXXX-XXXX-XXXX (Crockford base32; case, hyphens and spaces free)"}}},
    "Claimed": {"type": "object", "required": ["device_id", "role"], "properties": {
        "device_id": {"type": "string"}, "role": {"const": "owner"}}},
    "Share": {"type": "object", "required": ["user_id", "role"], "properties": {
        "user_id": {"type": "string"}, "role": {"enum": ["owner", *ROLES]}, "email": {"type": ["string", "null"]},
        "granted_at": {"type": "string"}}},
    "ShareRole": {"type": "object", "additionalProperties": False, "required": ["role"], "properties": {
        "role": {"enum": list(ROLES)}}},
    "PasswordGrant": {"type": "object", "additionalProperties": False, "required": ["username", "password"],
                      "properties": {"username": {"type": "string", "minLength": 1, "maxLength": 64},
                                     "password": {"type": "string", "minLength": 1, "maxLength": 1024},
                                     "otp": {"type": "string", "maxLength": 16}}},
    "UserToken": {"type": "object", "required": ["token", "token_type", "expires_in"], "properties": {
        "token": {"type": "string"}, "token_type": {"const": "Bearer"}, "expires_in": {"type": "integer"}}},
}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


class DeviceResources:
    """The user API: ``/users/me``, ``/users/token``, ``/devices...``.
    ``publish`` puts an event on the bus (thread safe); ``local_users`` is
    the zero-trust controller's ``check_local_user`` (None: no password
    grant)."""

    def __init__(self, devices: DeviceStore, auth: UserAuth, publish, local_users=None) -> None:
        self.devices = devices
        self.auth = auth
        self.publish = publish
        self.local_users = local_users
        self.limiter = ClaimLimiter()

    def ops(self) -> list[Op]:
        common = dict(tag=TAG, auth=self.auth, security="userToken")
        dev = {"id": _ID}
        return [
            Op("GET", "/users/me", self.me, "getMe", "The caller's profile (made at the first request)",
               responses={200: ("The profile", _ref("UserProfile"), (JSON,))}, **common),
            Op("POST", "/users/token", self.password_grant, "createUserToken",
               "A user token of relayd's own user directory", TAG, body=_ref("PasswordGrant"), auth=False,
               responses={200: ("The token (one hour)", _ref("UserToken"), (JSON,))}, errors=(401, 403, 429),
               description="The zero-trust controller's local users (relayd admin user ...): password, and otp "
                           "when the user has an authenticator; the same limits as a sign-in. Users of an "
                           "OpenID Connect provider use that provider's token instead."),
            Op("GET", "/devices", self.list, "listDevices", "The devices the caller owns or has a share of",
               responses={200: ("The devices", listing(_ref("EdgeDevice")), (JSON,))}, **common),
            Op("POST", "/devices/claim", self.claim, "claimDevice", "Claim a device with its claim code",
               body=_ref("ClaimRequest"), responses={200: ("Claimed: the caller owns it", _ref("Claimed"), (JSON,))},
               errors=(409, 412, 422, 429), write=True, **common,
               description="404 unknown_code, 409 already_claimed, 412 device_offline (the device must be "
                           "online); 429 after 10 failed attempts of the user within a minute."),
            Op("GET", "/devices/{id}", self.get, "getDevice", "One device", params=dev,
               responses={200: ("The device", _ref("EdgeDevice"), (JSON,))}, **common),
            Op("PATCH", "/devices/{id}", self.patch, "patchDevice", "Rename or relabel a device (owner, admin)",
               params=dev, body=_ref("DevicePatch"), responses={200: ("The device", _ref("EdgeDevice"), (JSON,))},
               errors=(403, 422), write=True, **common),
            Op("DELETE", "/devices/{id}", self.delete, "deleteDevice",
               "Remove a device: its certificate revoked, its tunnel cut (owner, admin)", params=dev,
               responses={204: ("Removed", None, ())}, errors=(403,), write=True, **common),
            Op("GET", "/devices/{id}/users", self.users, "listDeviceUsers", "Who may use a device (owner, admin)",
               params=dev, responses={200: ("The owner and the shares",
                                            listing(_ref("Share")), (JSON,))},
               errors=(403,), **common),
            Op("PUT", "/devices/{id}/users/{user_id}", self.put_share, "shareDevice",
               "Share a device with a user, or change their role (owner, admin)",
               params={"id": _ID, "user_id": _ID}, body=_ref("ShareRole"),
               responses={200: ("The share", _ref("Share"), (JSON,))}, errors=(403, 409, 422), write=True, **common),
            Op("DELETE", "/devices/{id}/users/{user_id}", self.delete_share, "unshareDevice",
               "Revoke a share (owner, admin; or the user leaving)", params={"id": _ID, "user_id": _ID},
               responses={204: ("Revoked: the proxy refuses the user at once", None, ())}, errors=(403,),
               write=True, **common),
        ]

    # -- users --

    def me(self, req: Request):
        u = self.devices.user(req.principal)
        return ok({**u, "created_at": rfc3339(u["created_at"])})

    def password_grant(self, req: Request):
        from relayd.control.zerotrust import Refused

        if self.local_users is None:
            raise ApiError(404, "not_found", "this relay has no user directory of its own")
        doc = req.body
        try:
            user = self.local_users(doc["username"], doc["password"], doc.get("otp"))
        except Refused as exc:
            metrics.USER_AUTH_REFUSALS.labels("password_" + exc.reason).inc()
            status = exc.status if exc.status in (401, 403, 429) else 401
            raise ApiError(status, exc.reason, str(exc)) from None
        token, ttl = self.auth.issue(user["username"], user.get("email"))
        req.target = user["username"]
        return ok({"token": token, "token_type": "Bearer", "expires_in": ttl}, headers=((b"Cache-Control",
                                                                                          b"no-store"),))

    # -- devices --

    @staticmethod
    def _view(d: dict, full: bool = False) -> dict:
        out = {"id": d["id"], "name": d["name"], "state": "online" if d["connected_since"] else "offline",
               "last_seen": rfc3339(d["last_seen"]) if d["last_seen"] else None, "claimed": d["owner"] is not None,
               "role": d["role"]}
        if full:
            out.update(labels=d["labels"], owner=d["owner"], node=d["node"] if d["connected_since"] else None,
                       remote_addr=d["remote_addr"] if d["connected_since"] else None,
                       created_at=rfc3339(d["created_at"]),
                       certificate={"serial": d["cert_serial"], "not_after": rfc3339(d["cert_not_after"])})
        return out

    def _mine(self, req: Request, least: str = "viewer") -> dict:
        d = self.devices.device(req.params["id"], req.principal)
        if d is None or d["role"] is None:
            raise ApiError(404, "not_found", "no such device")  # someone else's looks the same
        if _RANK[d["role"]] < _RANK[least]:
            raise ApiError(403, "forbidden", f"your role on this device is {d['role']}; this needs {least}")
        return d

    def list(self, req: Request):
        return ok({"items": [self._view(d) for d in self.devices.visible(req.principal)]})

    def get(self, req: Request):
        return ok(self._view(self._mine(req), full=True))

    def patch(self, req: Request):
        self._mine(req, "admin")
        self.devices.update(req.params["id"], req.body.get("name"), req.body.get("labels"))
        return ok(self._view(self._mine(req), full=True))

    def delete(self, req: Request):
        d = self._mine(req, "admin")
        self.devices.store.revoke_agent(d["id"])
        self.publish(Event(DEVICE_DELETED, d["id"]))
        return no_content()

    def claim(self, req: Request):
        user = req.principal
        wait = self.limiter.blocked(user)
        if wait:
            metrics.DEVICE_CLAIMS.labels("rate_limited").inc()
            raise ApiError(429, "too_many_attempts", "too many failed claims: try again later",
                           ((b"Retry-After", str(wait).encode()),))
        code = normalize_code(req.body["claim_code"])
        result, device = self.devices.claim(code_hash(code), user) if code else ("unknown_code", None)
        metrics.DEVICE_CLAIMS.labels(result).inc()
        if result == "unknown_code":
            self.limiter.failed(user)
            raise ApiError(404, "unknown_code", "no device has this claim code")
        if result == "already_claimed":
            raise ApiError(409, "already_claimed", "this device is claimed already")
        if result == "device_offline":
            raise ApiError(412, "device_offline", "the device must be online to be claimed")
        self.publish(Event(DEVICE_CLAIMED, device, {"device_id": device, "owner": user}))
        req.target = device
        return ok({"device_id": device, "role": "owner"})

    # -- sharing --

    def users(self, req: Request):
        d = self._mine(req, "admin")
        owner = self.devices.user(d["owner"]) if d["owner"] else None
        out = [{"user_id": owner["id"], "role": "owner", "email": owner["email"],
                "granted_at": rfc3339(d["claimed_at"])}] if owner else []
        return ok({"items": out + self.devices.shares(d["id"])})

    def put_share(self, req: Request):
        d = self._mine(req, "admin")
        target = req.params["user_id"]
        if self.devices.user(target) is None:
            raise ApiError(404, "not_found", "no such user (they appear at their first request: GET /users/me)")
        if target == d["owner"]:
            raise ApiError(409, "conflict", "that user owns the device")
        role = req.body["role"]
        self.devices.share(d["id"], target, role)
        share = next(s for s in self.devices.shares(d["id"]) if s["user_id"] == target)
        return ok(share)

    def delete_share(self, req: Request):
        target = req.params["user_id"]
        d = self._mine(req, "viewer" if target == req.principal else "admin")
        if not self.devices.unshare(d["id"], target):
            raise ApiError(404, "not_found", "that user has no share of this device")
        return no_content()
