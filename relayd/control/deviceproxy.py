"""The device proxy's control side (issue 13 item 5;
../shared/specs/device-cloud.md section 7.5): proxy tokens, who may do what
on a device, ``POST /api/v1/token`` and the key set at
``/.well-known/jwks.json``.

Theory of operation
-------------------
A signed-in user (the device API's one user-authentication function, as
for the webhooks) asks ``POST /api/v1/token`` for a proxy token: a compact
JWS (relayd.control.jws, type ``relayd-proxy+jwt``, EdDSA / Ed25519,
header ``kid``) with ``iss`` (the relay's URL), ``aud``
``relayd-device-proxy``, ``sub`` (the user's id), ``iat``, ``nbf``,
``exp`` (five minutes), ``jti`` and ``devs``: each device the user owns or
has a share of, with the role (``owner``, ``admin``, ``operator``,
``viewer``); only the one asked for when the body names a ``device_id``.
The signing key is the data directory's ``proxy-signing.key`` (0600, made at
the first start), its own: a device token (``device-signing.key``, another
``typ`` and audience) never passes as a proxy token. Its public half is
published as a JWK set (OKP, Ed25519) so that anyone can check the tokens.

The proxy (relayd.gateway.deviceproxy) checks a token on every request and
then asks the store again (``role_now``): the token is a ceiling, the store
says what holds now, so a revoked share stops working at once although the
token lives on for its few minutes. The weaker of the two roles applies.

Roles and methods: ``viewer`` may GET and HEAD; ``operator``, ``admin`` and
``owner`` may use every method.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relayd import metrics
from relayd.control import jws
from relayd.control.api import JSON, ApiError, Op, Request, ok

KEY_FILE = "proxy-signing.key"
AUDIENCE = "relayd-device-proxy"
TOKEN_TTL = 300
#: Clock skew allowed on a token's times (the relay made it: small).
SKEW = 30
#: Checked proxy tokens kept (ProxyTokens.verify); the table starts again when full.
CHECKED_TOKENS = 4096
#: The most devices one token lists (ask for one device_id beyond that).
MAX_DEVICES = 100
ROLES = ("viewer", "operator", "admin", "owner")
_RANK = {r: i for i, r in enumerate(ROLES)}
#: The methods each role may use through the proxy (None: all).
READ_METHODS = frozenset({b"GET", b"HEAD"})


def may(role: str, method: bytes) -> bool:
    """Whether ``role`` may send ``method`` through the proxy."""
    return role in _RANK and (role != "viewer" or method in READ_METHODS)


def weaker(a: str, b: str) -> str:
    return a if _RANK.get(a, -1) <= _RANK.get(b, -1) else b


def device_roles(store, user_id: str) -> dict[str, str]:
    """Every device ``user_id`` owns or has a share of, with the role
    (owning beats a share). Revoked devices are left out."""
    rows = store.query(
        "SELECT d.id, 'owner' FROM dc_devices d JOIN agents a ON a.id = d.id WHERE d.owner = ? AND a.revoked_at IS NULL"
        " UNION ALL SELECT s.device_id, s.role FROM dc_shares s JOIN agents a ON a.id = s.device_id"
        " WHERE s.user_id = ? AND a.revoked_at IS NULL", (user_id, user_id))
    out: dict[str, str] = {}
    for device, role in rows:
        if role in _RANK and _RANK[role] > _RANK.get(out.get(device, ""), -1):
            out[device] = role
    return out


def role_now(store, device_id: str, user_id: str) -> tuple[bool, str | None]:
    """(the device exists and is not revoked, the user's role on it now or None)."""
    rows = store.query(
        "SELECT d.owner, (SELECT role FROM dc_shares s WHERE s.device_id = d.id AND s.user_id = ?)"
        " FROM dc_devices d JOIN agents a ON a.id = d.id WHERE d.id = ? AND a.revoked_at IS NULL",
        (user_id, device_id))
    if not rows:
        return False, None
    owner, shared = rows[0]
    if owner == user_id:
        return True, "owner"
    return True, shared if shared in _RANK else None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ProxyTokens:
    """Proxy tokens: made for ``POST /api/v1/token``, checked by the proxy.
    ``issuer()`` is the relay's URL now (its HTTPS address is known once
    bound)."""

    def __init__(self, key: Ed25519PrivateKey, issuer: Callable[[], str], ttl: int = TOKEN_TTL) -> None:
        self.key = key
        self.issuer = issuer
        self.ttl = ttl
        self.kid = jws.key_id(key.public_key())
        self.keys = {self.kid: key.public_key()}
        # Tokens whose signature and JSON have been checked, by their exact text: a client
        # sends the same one with every request, and the signature check is most of a
        # request's cost. What can change (times, issuer) is checked at every use; what the
        # user may do now is the store's, asked at every request anyway.
        self._checked: dict[str, dict] = {}

    def issue(self, user_id: str, devs: dict[str, str], now: float | None = None) -> str:
        now = int(now if now is not None else time.time())
        claims = {"iss": self.issuer(), "aud": AUDIENCE, "sub": user_id, "iat": now, "nbf": now,
                  "exp": now + self.ttl, "jti": secrets.token_urlsafe(12), "devs": devs}
        return jws.sign(claims, jws.PROXY, self.key)

    def verify(self, token: str, now: float | None = None) -> tuple[str, dict[str, str]]:
        """(user id, devs) of a good token; jws.TokenError (``reason``) if not."""
        claims = self._checked.get(token)
        if claims is None:
            claims = jws.verify(token, jws.PROXY, self.keys)
            if len(self._checked) >= CHECKED_TOKENS:
                self._checked.clear()
            self._checked[token] = claims
        if claims.get("aud") != AUDIENCE:
            raise jws.TokenError("audience", "the token is not for the device proxy")
        if claims.get("iss") != self.issuer():
            raise jws.TokenError("issuer", "the token is not this relay's")
        jws.check_window(claims, time.time() if now is None else now, before=SKEW, after=0)
        sub, devs = claims.get("sub"), claims.get("devs")
        if not isinstance(sub, str) or not 0 < len(sub) <= 128:
            raise jws.TokenError("json", "the token names no user")
        if not isinstance(devs, dict) or not all(isinstance(k, str) and v in _RANK for k, v in devs.items()):
            raise jws.TokenError("json", "the token's devs is not a map of device ids to roles")
        return sub, devs

    def jwks(self) -> dict:
        """The public key set (RFC 7517; OKP keys: RFC 8037)."""
        raw = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(raw), "kid": self.kid, "use": "sig",
                          "alg": "EdDSA"}]}


def no_user_auth(head, cred) -> str:
    raise ApiError(401, "unauthorized", "user sign-in for the device API is not configured on this relay",
                   ((b"WWW-Authenticate", b'Bearer realm="relayd"'),))


def _proxy_only(head, cred):
    raise ApiError(401, "unauthorized", "the device proxy takes Authorization: Bearer <proxy token>",
                   ((b"WWW-Authenticate", b'Bearer realm="relayd-device-proxy"'),))


TAG = "device proxy"
_ERROR = {"$ref": "#/components/schemas/Error"}
SCHEMAS = {
    "TokenRequest": {"type": "object", "additionalProperties": False, "properties": {
        "device_id": {"type": "string", "minLength": 1, "maxLength": 128,
                      "description": "only this device in the token"}}},
    "ProxyToken": {"type": "object", "required": ["token", "token_type", "expires_in"], "properties": {
        "token": {"type": "string", "description": "compact JWS (EdDSA); keys at /.well-known/jwks.json"},
        "token_type": {"const": "Bearer"}, "expires_in": {"type": "integer"}}},
}
PROXY_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


class ProxyResources:
    """``POST /api/v1/token`` and the proxy's routes in the API's table
    (the proxy itself serves them: relayd.gateway.deviceproxy).
    ``user_auth(head, cred)`` returns the calling user's id (dc_users.id)
    or raises ApiError 401: the device API's one user-authentication
    function."""

    def __init__(self, store, tokens: ProxyTokens | None, user_auth=no_user_auth) -> None:
        self.store = store
        self.tokens = tokens
        self.user_auth = user_auth

    def authenticate(self, head, cred):
        return self.user_auth(head, cred)

    def ops(self) -> list[Op]:
        ops = [Op("POST", "/token", self.token, "createProxyToken", "A proxy token for the user's devices", TAG,
                  body={"$ref": "#/components/schemas/TokenRequest"}, body_optional=True,
                  responses={200: ("The token", {"$ref": "#/components/schemas/ProxyToken"}, (JSON,))},
                  errors=(422,), auth=self.authenticate, security="userToken",
                  description="Lists each device the user owns or has a share of with the role (devs), or "
                              "only device_id; five minutes of life. The proxy checks the role again at every "
                              "request.")]
        for m in PROXY_METHODS:
            ops.append(Op(
                m, "/devices/{id}/proxy/{path}", self._not_here, f"proxy{m.capitalize()}",
                f"{m} the device's local service, through its tunnel", TAG,
                params={"id": {"type": "string", "minLength": 1, "maxLength": 128},
                        "path": {"type": "string", "description": "the rest of the path, any number of segments"}},
                responses={200: ("The device service's answer, streamed as it is", None, ()),
                           403: ("The token does not list the device, or the role (checked now) does not allow "
                                 "this method", _ERROR, (JSON,)),
                           502: ("The agent or the device's service failed", _ERROR, (JSON,)),
                           503: ("device_offline: the device's tunnel is down", _ERROR, (JSON,)),
                           504: ("The device's service did not answer in time", _ERROR, (JSON,))},
                auth=_proxy_only, security="proxyToken",
                description="Any body streams both ways; WebSocket upgrades pass. viewer: GET and HEAD; "
                            "operator, admin, owner: every method. Authorization is not passed on; the service "
                            "gets X-Relayd-User, X-Relayd-Role and X-Forwarded-For."))
        return ops

    def _not_here(self, req: Request):
        raise ApiError(404, "not_found", "the device proxy serves this path on the relay's HTTPS port")

    def token(self, req: Request):
        user = req.principal
        wanted = (req.body or {}).get("device_id")
        if wanted is not None:
            exists, role = role_now(self.store, wanted, user)
            if not exists or role is None:
                raise ApiError(404, "not_found", "no such device among yours")
            devs = {wanted: role}
        else:
            devs = device_roles(self.store, user)
            if len(devs) > MAX_DEVICES:
                raise ApiError(422, "too_many_devices", f"you have more than {MAX_DEVICES} devices: ask for one "
                                                        "device_id")
        req.target = wanted or user
        metrics.DEVICE_PROXY_TOKENS.labels("one" if wanted is not None else "all").inc()
        return ok({"token": self.tokens.issue(user, devs), "token_type": "Bearer", "expires_in": self.tokens.ttl})
