"""The device proxy (issue 13 item 5; ../shared/specs/device-cloud.md
section 7.5): ``ANY /api/v1/devices/{id}/proxy/{path}`` on the relay's own
names reaches the device's local service through its tunnel.

Theory of operation
-------------------
The proxy is a gate route of the HTTPS front door (relayd.net.http_ingress
``Route.gate``): the ingress frames the requests and responses, streams the
bodies both ways and passes WebSocket upgrades as it does for HTTP
endpoints; this module only decides, once per request:

1. the path: ``/api/v1/devices/{id}/proxy`` and what follows (the ingress
   has already refused encoded slashes and backslashes and resolved dot
   segments, so ``{id}`` is the device routing sees);
2. the token: ``Authorization: Bearer <proxy token>``
   (relayd.control.deviceproxy): 401 when missing, malformed, forged,
   expired, another audience's or another type's;
3. the store, in a worker thread, now: 404 when the device does not exist
   (or is revoked); 403 when the token does not list it, when the user has
   no role on it any more (a revoked share), or when the role (the weaker
   of the token's and the store's) does not allow the method;
4. the tunnel: 503 ``device_offline`` when the device has no live link;
   502 when it offers no service. The service is the agent's endpoint
   named ``device``, else the first endpoint it offered.

An admitted request goes on an ``http`` stream opened through the stream
seam on that device's link (``seam.open(..., agent=device id)``), with the
path after ``/proxy`` (``/`` when none) and the query, ``Authorization``
and any ``X-Relayd-*`` the client sent removed, and ``X-Relayd-User``,
``X-Relayd-Role``, ``X-Relayd-Device`` and ``X-Forwarded-Prefix`` added
(``X-Forwarded-For`` and ``Forwarded`` come from the ingress). A kept-alive
stream serves the next request of the same client connection for the same
device, service and user, each request checked on its own.

Every refusal answers ``{"error", "message"}`` with Connection: close, is
counted in ``relayd_device_proxy_requests_total{result}`` (``admitted`` for
the others) and logged (rate limited) with the device, the reason and the
client: never a token.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse

from relayd import metrics
from relayd.control import jws
from relayd.control.deviceproxy import ProxyTokens, may, weaker
from relayd.core import http1
from relayd.core.wire import KIND_HTTP
from relayd.log import RateLimitedLog, caught

log = logging.getLogger("relayd.deviceproxy")
_LOG = RateLimitedLog(log)

PREFIX = "/api/v1/devices/"
_PATH = re.compile(r"/api/v1/devices/([^/]+)/proxy(?=/|\Z)")
#: The endpoint a device's proxied service has, when it has several.
SERVICE = "device"
_REALM = b'Bearer realm="relayd-device-proxy"'
_ERRORS = {400: "bad_request", 500: "internal", 502: "bad_gateway", 503: "device_offline", 504: "gateway_timeout"}
_RESULTS = {400: "bad_request", 500: "internal", 502: "bad_gateway", 503: "offline", 504: "timeout"}


class _Refusal(Exception):
    def __init__(self, status: int, code: str, result: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.result = status, code, result


class DeviceProxy:
    """The gate (``claims``, ``admit``, ``error``). ``role_now(device,
    user)`` is relayd.control.deviceproxy.role_now over the store (run in a
    worker thread), ``sessions(device)`` the device's live AgentSession or
    None, ``open`` the stream seam's open."""

    def __init__(self, tokens: ProxyTokens, role_now, sessions, open_stream) -> None:
        self.tokens = tokens
        self.role_now = role_now
        self.sessions = sessions
        self.open_stream = open_stream

    def claims(self, path: str) -> bool:
        return _PATH.match(path) is not None

    def error(self, status: int, text: str) -> http1.Reply:
        """The ingress's own failures (502, 503, 504...) of a proxied request."""
        metrics.DEVICE_PROXY_REQUESTS.labels(_RESULTS.get(status, str(status))).inc()
        return http1.error_reply(status, _ERRORS.get(status, "error"), text)

    def admit(self, req, client: str, answer):
        path = req.path.decode("latin-1")
        m = _PATH.match(path)
        device = None
        try:
            if m is None:
                raise _Refusal(404, "not_found", "bad_path", "not a device proxy path")
            try:
                device = urllib.parse.unquote(m.group(1), errors="strict")
            except UnicodeDecodeError:
                raise _Refusal(404, "not_found", "unknown_device", "no such device") from None
            user, devs = self._token(req.headers)
        except _Refusal as exc:
            self._refuse(answer, exc, device, None, req, client)
            return None
        return asyncio.get_running_loop().create_task(self._check(req, client, answer, m.end(), device, user, devs))

    def _token(self, headers) -> tuple[str, dict]:
        values = [v for k, v in headers if k.lower() == b"authorization"]
        if not values:
            raise _Refusal(401, "unauthorized", "no_token", "send Authorization: Bearer <proxy token> "
                                                           "(POST /api/v1/token)")
        v = values[0]
        if len(values) > 1 or v[:7].lower() != b"bearer " or not v[7:].strip():
            raise _Refusal(401, "unauthorized", "malformed", "send one Authorization: Bearer <proxy token>")
        try:
            return self.tokens.verify(v[7:].strip().decode("latin-1"))
        except jws.TokenError as exc:
            text = "the proxy token has expired" if exc.reason == "expired" else "the proxy token is not valid"
            raise _Refusal(401, "unauthorized", f"token_{exc.reason}", text) from None

    async def _check(self, req, client: str, answer, cut: int, device: str, user: str, devs: dict) -> None:
        try:
            try:
                exists, role = await asyncio.to_thread(self.role_now, device, user)
            except Exception:
                log.exception("device proxy: the store failed")
                raise _Refusal(503, "unavailable", "store", "the relay's database failed; try again") from None
            if not exists:
                raise _Refusal(404, "not_found", "unknown_device", "no such device")
            if device not in devs:
                raise _Refusal(403, "forbidden", "not_in_token", "the token does not list this device")
            if role is None:
                raise _Refusal(403, "forbidden", "no_role", "you have no role on this device (any more)")
            role = weaker(role, devs[device])
            if not may(role, req.method):
                raise _Refusal(403, "forbidden", "role", f"the {role} role may only GET and HEAD")
            sess = self.sessions(device)
            if sess is None or not sess.conn.accepting_streams:
                raise _Refusal(503, "device_offline", "offline", "the device is not connected")
            service = SERVICE if SERVICE in sess.offered else (sess.offered[0] if sess.offered else None)
            if service is None:
                raise _Refusal(502, "no_service", "no_service", "the device offers no service to proxy to")
        except _Refusal as exc:
            self._refuse(answer, exc, device, user, req, client)
            return
        except Exception as exc:  # a bug: this request's answer only
            caught("device_proxy", exc, device=device)
            self._refuse(answer, _Refusal(500, "internal", "internal", "the relay failed"), device, user, req, client)
            return
        metrics.DEVICE_PROXY_REQUESTS.labels("admitted").inc()
        log.debug("device proxy request", extra={"device": device, "user": user, "role": role, "client": client})
        head = rewrite(req.upstream_head, cut, device, user, role, req.url[:cut])

        def opener(ready):
            return self.open_stream(service, client, ready, kind=KIND_HTTP, identity=user, agent=device)

        answer((f"{device}\0{service}\0{user}", head, opener))

    @staticmethod
    def _refuse(answer, exc: _Refusal, device, user, req, client: str) -> None:
        metrics.DEVICE_PROXY_REQUESTS.labels(exc.result).inc()
        _LOG.info("device proxy request refused", extra={
            "device": (device or "")[:128], "user": user, "reason": exc.result, "status": exc.status,
            "method": req.method.decode("latin-1")[:16], "client": client})
        headers = ((b"WWW-Authenticate", _REALM + b', error="invalid_token"'),) if exc.status == 401 else ()
        answer(http1.error_reply(exc.status, exc.code, str(exc), headers))


def rewrite(head: bytes, cut: int, device: str, user: str, role: str, prefix: bytes) -> bytes:
    """The ingress's request head for the service, for the device: the
    target after ``/proxy``, no Authorization nor X-Relayd-* of the client,
    the relay's X-Relayd-* and X-Forwarded-Prefix added."""
    lines = head[:len(head) - 4].split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    url, _, version = rest.rpartition(b" ")
    target = url[cut:]
    if not target.startswith(b"/"):
        target = b"/" + target
    out = [method + b" " + target + b" " + version]
    for line in lines[1:]:
        name = line.partition(b":")[0].lower()
        if name == b"authorization" or name.startswith(b"x-relayd-") or name == b"x-forwarded-prefix":
            continue
        out.append(line)
    out.append(b"X-Relayd-User: " + _field(user))
    out.append(b"X-Relayd-Role: " + role.encode())
    out.append(b"X-Relayd-Device: " + _field(device))
    out.append(b"X-Forwarded-Prefix: " + prefix)
    out.append(b"\r\n")
    return b"\r\n".join(out)


def _field(text: str) -> bytes:
    """A header value of an id: printable ASCII only (ids are; anything else
    is percent-encoded, so it can never end the line)."""
    return urllib.parse.quote(text, safe="!#$&'()*+,-./:;=?@[]^_`{|}~").encode("ascii")
