"""The web console (docs/console.md): its pages under ``/console/`` and the
sign-in that turns the admin key into a browser session, whose cookie the
admin API then takes in place of the key.

Theory of operation
-------------------
The console is a small static bundle (``console_assets/``: one HTML shell,
one script, one style sheet, an icon), read into memory at start and served
from that table only: a path that is not in it is 404, so no request can
name a file. Every page is the same shell; the script reads the path,
fetches what it shows from ``/api/v1/admin/...`` and polls every few
seconds (the API has no event stream). It builds the DOM with
``textContent`` only, never from HTML text, and the Content-Security-Policy
(``script-src 'self'``, Trusted Types required, no framing) makes an
injected tag inert even if one slipped through.

Signing in: the page sends the admin key once, as ``Authorization: Bearer``,
to ``POST /api/v1/admin/console/session``. The relay answers with a session
cookie (``__Secure-relayd_console``: HttpOnly, Secure, SameSite=Strict,
``Path=/api/v1/admin``) and a CSRF token. The page keeps the token in its
tab's sessionStorage; the key is dropped at once. From then on the page
calls the API with the cookie and ``X-Relayd-CSRF: <token>``. Why a cookie
and not the key in sessionStorage: a script that runs in the page (an XSS)
could read the key from storage and keep it for ever; it cannot read an
HttpOnly cookie, and what it could do through the session ends with the
session.

A cookie is ambient, so the API accepts it only with proof that the tab
that signed in made the request (``authorize``):

* the CSRF token of that session, on every request. The relay hands it
  out once, in the sign-in's answer, and never again: a page that shares
  the console's origin without being the console (a hybrid connection's
  HTTP answer, a device's page through the device proxy) can send the
  cookie but cannot learn the token. A form or a plain fetch from another
  origin cannot set the header, and a fetch that sets it needs a CORS
  preflight the relay never allows;
* ``Sec-Fetch-Site``, where the browser sends it, must be ``same-origin``,
  and ``Origin``, where sent, must be the relay's own (a page of a sibling
  host name is *same-site*: SameSite=Strict alone would let its requests
  carry the cookie);
* the Host must be a relay name the console is served on: names that also
  carry HTTP endpoints (an agent's content on the console's origin) get
  neither the console nor its sessions.

Sessions live in this process's memory, keyed by the SHA-256 of their
random id: they end after ``idle`` without a request, after ``lifetime`` in
any case, at sign-out, when the admin key is rotated (each session is bound
to the key's hash, read at every request), and when the relay restarts. A
session cannot make another session or rotate the admin key: those take
the key itself. Failed sign-ins are limited per client address.

Refusals are API answers (``relayd_api_requests_total``, the API's
rate-limited log line) and are counted by reason in
``relayd_console_auth_refusals_total``; the pages are counted in
``relayd_console_requests_total{page, status}``. No log line holds the
key, a session id or a CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from importlib import resources

from relayd import metrics
from relayd.control.api import JSON, PREFIX, REALM, ApiError, Op, Request, ok, rfc3339
from relayd.core import http1
from relayd.log import RateLimitedLog

log = logging.getLogger("relayd.console")
audit_log = logging.getLogger("relayd.audit")
_LOG = RateLimitedLog(log)

#: Where the console is, on the relay's own names (the HTTPS port).
PATH = "/console"
COOKIE = "__Secure-relayd_console"
#: The cookie goes to the admin API only: never to the console's static
#: pages, the device proxy (/api/v1/devices/...) or anything an agent serves.
COOKIE_PATH = PREFIX + "/admin"
CSRF_HEADER = "X-Relayd-CSRF"
SESSION_ROUTE = "/admin/console/session"

#: path under /console/ -> (metric label, asset file). Every page is the shell.
PAGES = {"": "overview", "agents": "agents", "endpoints": "endpoints", "hybrid": "hybrid", "users": "users"}
ASSETS = {"static/console.js": "text/javascript; charset=utf-8", "static/console.css": "text/css; charset=utf-8",
          "static/icon.svg": "image/svg+xml"}
SHELL = "index.html"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'; require-trusted-types-for 'script'; "
       "trusted-types 'none'")
_COMMON = ((b"X-Content-Type-Options", b"nosniff"), (b"Cross-Origin-Resource-Policy", b"same-origin"),
           (b"Referrer-Policy", b"no-referrer"))
PAGE_HEADERS = _COMMON + ((b"Content-Security-Policy", CSP.encode()), (b"X-Frame-Options", b"DENY"),
                          (b"Cross-Origin-Opener-Policy", b"same-origin"), (b"Cache-Control", b"no-store"),
                          (b"Permissions-Policy", b"camera=(), microphone=(), geolocation=(), usb=()"))
ASSET_HEADERS = _COMMON + ((b"Cache-Control", b"no-cache"),)
#: Query parameters that carry credentials: a key in a URL is refused (it
#: would sit in the browser's history and proxies' logs).
_CREDENTIAL_PARAMS = {"key", "api_key", "apikey", "token", "access_token", "password", "secret", "session",
                      "csrf"}


@dataclass(frozen=True)
class ConsoleConfig:
    """The console's limits, with safe defaults."""

    #: A session ends after this long without a request (seconds).
    idle: float = 30 * 60.0
    #: ... and this long after sign-in in any case.
    lifetime: float = 8 * 3600.0
    #: Sessions at once; a new one beyond it ends the least recently used.
    max_sessions: int = 64
    #: Failed sign-ins from one address within ``fail_window`` before 429.
    max_failures: int = 10
    fail_window: float = 60.0


@dataclass
class Session:
    digest: str  # SHA-256 of the session id (the id itself is never kept)
    csrf: str
    key_hash: str  # the admin key's hash at sign-in
    created: float
    used: float
    client: str

    @property
    def handle(self) -> str:
        """A name for logs and audit lines: not the id, not usable as one."""
        return self.digest[:12]


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode("latin-1")).hexdigest()


class Sessions:
    """The console's sessions, in memory; thread safe (the API's handlers
    run in worker threads)."""

    def __init__(self, cfg: ConsoleConfig = ConsoleConfig(), clock=time.time) -> None:
        self.cfg, self.clock = cfg, clock
        self._by_digest: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_digest)

    def create(self, key_hash: str, client: str) -> tuple[str, Session]:
        """A new session: (its id, for the cookie only; the session)."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        s = Session(_digest(sid), secrets.token_urlsafe(32), key_hash, now, now, client)
        with self._lock:
            self._expire(now)
            while len(self._by_digest) >= self.cfg.max_sessions:
                old = min(self._by_digest.values(), key=lambda x: x.used)
                del self._by_digest[old.digest]
                log.info("console session ended: too many sessions", extra={"session": old.handle,
                                                                            "reason": "evicted"})
            self._by_digest[s.digest] = s
            metrics.CONSOLE_SESSIONS.set(len(self._by_digest))
        return sid, s

    def find(self, sid: str, key_hash: str | None) -> tuple[Session | None, str]:
        """The live session of ``sid`` (its last use now) or None and why
        not: ``unknown``, ``expired``, ``key_rotated``."""
        now = self.clock()
        with self._lock:
            s = self._by_digest.get(_digest(sid))
            if s is None:
                return None, "unknown"
            if now - s.used > self.cfg.idle or now - s.created > self.cfg.lifetime:
                reason = "expired"
            elif key_hash is None or not hmac.compare_digest(s.key_hash, key_hash):
                reason = "key_rotated"
            else:
                s.used = now
                return s, ""
            del self._by_digest[s.digest]
            metrics.CONSOLE_SESSIONS.set(len(self._by_digest))
        log.info("console session ended", extra={"session": s.handle, "reason": reason})
        return None, reason

    def end(self, s: Session) -> None:
        with self._lock:
            self._by_digest.pop(s.digest, None)
            metrics.CONSOLE_SESSIONS.set(len(self._by_digest))

    def expires(self, s: Session) -> tuple[float, float]:
        """(when it ends at the latest, when it ends without a request)."""
        return s.created + self.cfg.lifetime, min(s.used + self.cfg.idle, s.created + self.cfg.lifetime)

    def _expire(self, now: float) -> None:
        for d in [d for d, s in self._by_digest.items()
                  if now - s.used > self.cfg.idle or now - s.created > self.cfg.lifetime]:
            del self._by_digest[d]


class _Failures:
    """Failed sign-ins per client address in a fixed window; bounded."""

    def __init__(self, cfg: ConsoleConfig, clock=time.monotonic) -> None:
        self.cfg, self.clock = cfg, clock
        self._seen: dict[str, list] = {}
        self._lock = threading.Lock()

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            w = self._seen.get(client)
            if w is None or now - w[0] >= self.cfg.fail_window:
                return 0.0
            return self.cfg.fail_window - (now - w[0]) if w[1] >= self.cfg.max_failures else 0.0

    def add(self, client: str) -> None:
        now = self.clock()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {k: w for k, w in self._seen.items() if now - w[0] < self.cfg.fail_window}
            w = self._seen.get(client)
            if w is None or now - w[0] >= self.cfg.fail_window:
                self._seen[client] = [now, 1]
            else:
                w[1] += 1


def host_of(head) -> str:
    """The request's host name, lower case, without its port."""
    text = (head.get(b"host") or b"").decode("latin-1").lower()
    return text.split("]")[0] + "]" if text.startswith("[") else text.rsplit(":", 1)[0]


def cookies(head, name: str) -> list[str]:
    """The values of cookie ``name`` in the request (several when other
    cookies of that name were set for the host; at most 4 looked at)."""
    out = []
    for k, v in head.headers:
        if k.lower() != b"cookie":
            continue
        for part in v.split(b";"):
            n, eq, val = part.strip().partition(b"=")
            if eq and n == name.encode() and 0 < len(val) <= 128:
                out.append(val.decode("latin-1"))
    return out[:4]


def load_assets() -> dict[str, bytes]:
    """The bundle's files, read once."""
    root = resources.files("relayd.control").joinpath("console_assets")
    return {name: root.joinpath(*name.split("/")).read_bytes() for name in (SHELL, *ASSETS)}


class Console:
    """The console's sessions, their routes in the API and the pages.
    ``key_ok(key)`` checks an admin key; ``key_hash()`` is the admin key's
    hash now (None: none set); ``hosts`` are the relay names the console
    is served on."""

    def __init__(self, key_ok, key_hash, hosts, cfg: ConsoleConfig = ConsoleConfig(), clock=time.time) -> None:
        self.key_ok, self.key_hash = key_ok, key_hash
        self.hosts = frozenset(h.lower() for h in hosts)
        self.cfg = cfg
        self.sessions = Sessions(cfg, clock)
        self.failures = _Failures(cfg)
        self.assets = load_assets()

    # -- the API's side -----------------------------------------------------------------------------

    #: The OpenAPI security schemes of a console session.
    SECURITY = {
        "consoleSession": {"type": "apiKey", "in": "cookie", "name": COOKIE,
                           "description": "The web console's session (docs/console.md): made by POST "
                                          f"{PREFIX}{SESSION_ROUTE} with the admin key; taken only with "
                                          f"{CSRF_HEADER}."},
        "consoleCsrf": {"type": "apiKey", "in": "header", "name": CSRF_HEADER,
                        "description": "The console session's CSRF token, from the answer of its sign-in "
                                       "(given there only)."}}

    def _refuse(self, status: int, code: str, reason: str, message: str) -> ApiError:
        metrics.CONSOLE_AUTH_REFUSALS.labels(reason).inc()
        headers = ((b"WWW-Authenticate", REALM.encode()),) if status == 401 else ()
        return ApiError(status, code, message, headers)

    def _origin(self, head) -> str:
        """The host the request is for; ApiError unless it comes from the
        console's own origin on a name the console is served on."""
        host = host_of(head)
        if host not in self.hosts:
            raise self._refuse(403, "forbidden", "wrong_host", "the console is not served on this host name")
        site = head.get(b"sec-fetch-site")
        if site is not None and site != b"same-origin":
            raise self._refuse(403, "forbidden", "cross_site", "a console session is taken from the console's own "
                                                               "pages only")
        origin = head.get(b"origin")
        if origin is not None and origin.decode("latin-1").lower() != "https://" + \
                (head.get(b"host") or b"").decode("latin-1").lower():
            raise self._refuse(403, "forbidden", "cross_site", "a console session is taken from the console's own "
                                                               "pages only")
        return host

    def session_of(self, head) -> Session | None:
        """The console session a request carries (None: it carries no
        console cookie); ApiError when it carries one that does not hold:
        401 (no such session, ended), 403 (another origin, no or a wrong
        CSRF token)."""
        values = cookies(head, COOKIE)
        if not values:
            return None
        self._origin(head)
        key_hash = self.key_hash()
        found, why = None, "unknown"
        for v in values:
            found, why = self.sessions.find(v, key_hash)
            if found is not None:
                break
        if found is None:
            raise self._refuse(401, "unauthorized", why, "the console session has ended: sign in again"
                               if why != "unknown" else "no such console session: sign in")
        token = head.get(CSRF_HEADER.lower().encode())
        if token is None:
            raise self._refuse(403, "csrf", "no_csrf", f"a console session needs {CSRF_HEADER}")
        if not hmac.compare_digest(token, found.csrf.encode()):
            raise self._refuse(403, "csrf", "bad_csrf", f"wrong {CSRF_HEADER}")
        return found

    def authorize(self, head) -> str | None:
        """The Api's ``session_auth``: the actor of a request carrying a
        console session (None: it carries none)."""
        return None if self.session_of(head) is None else "console"

    def _signin_auth(self, head, cred: dict):
        client = cred.get("client", "")
        self._origin(head)
        wait = self.failures.blocked(client)
        if wait:
            metrics.CONSOLE_SIGNINS.labels("rate_limited").inc()
            raise ApiError(429, "too_many_requests", "too many failed sign-ins from this address: try again later",
                           ((b"Retry-After", str(max(1, int(wait) + 1)).encode()),))
        v = head.get(b"authorization")
        if v is None or v[:7].lower() != b"bearer " or not v[7:].strip():
            metrics.CONSOLE_SIGNINS.labels("no_key").inc()
            raise ApiError(401, "unauthorized", "sign in with Authorization: Bearer <admin key>",
                           ((b"WWW-Authenticate", REALM.encode()),))
        if not self.key_ok(v[7:].strip().decode("latin-1")):
            self.failures.add(client)
            metrics.CONSOLE_SIGNINS.labels("wrong_key").inc()
            raise ApiError(401, "unauthorized", "wrong admin key",
                           ((b"WWW-Authenticate", (REALM + ', error="invalid_token"').encode()),))
        return "admin"

    def _session_auth(self, head, cred: dict):
        s = self.session_of(head)
        if s is None:
            raise self._refuse(401, "unauthorized", "no_cookie", "no console session: sign in")
        return s

    def _doc(self, s: Session) -> dict:
        hard, idle = self.sessions.expires(s)
        return {"csrf": s.csrf, "expires_at": rfc3339(round(hard)), "idle_expires_at": rfc3339(round(idle)),
                "idle_timeout": int(self.cfg.idle)}

    def _create(self, req: Request):
        key_hash = self.key_hash()
        sid, s = self.sessions.create(key_hash or "", req.client)
        req.target = s.handle
        metrics.CONSOLE_SIGNINS.labels("ok").inc()
        cookie = (f"{COOKIE}={sid}; Path={COOKIE_PATH}; Max-Age={int(self.cfg.lifetime)}; Secure; HttpOnly; "
                  "SameSite=Strict")
        return ok(self._doc(s), 201, ((b"Set-Cookie", cookie.encode()),))

    def _get(self, req: Request):
        req.target = req.principal.handle
        return ok(self._doc(req.principal))

    def _delete(self, req: Request):
        req.target = req.principal.handle
        self.sessions.end(req.principal)
        log.info("console session ended", extra={"session": req.principal.handle, "reason": "signed_out"})
        return http1.Reply(204, headers=((b"Set-Cookie", f"{COOKIE}=; Path={COOKIE_PATH}; Max-Age=0; Secure; "
                                                         "HttpOnly; SameSite=Strict".encode()),))

    def ops(self) -> list[Op]:
        doc = {"$ref": "#/components/schemas/ConsoleSession"}
        common = dict(tag="console", errors=(401, 403))
        return [
            Op("POST", SESSION_ROUTE, self._create, "create_console_session",
               "Sign in to the web console: the admin key for a session cookie", auth=self._signin_auth,
               security="adminKey", write=True, responses={201: ("The session: its cookie is in Set-Cookie",
                                                                 doc, (JSON,))},
               description="The admin key as Bearer, once; the answer sets the session cookie (HttpOnly, Secure, "
                           f"SameSite=Strict, Path={COOKIE_PATH}) and gives the CSRF token every later request "
                           f"sends as {CSRF_HEADER}. Failed sign-ins are limited per address (429).",
               **{**common, "errors": (401, 403, 429)}),
            Op("GET", SESSION_ROUTE, self._get, "get_console_session",
               "The console session of the request: whether it holds, and until when", auth=self._session_auth,
               security=("consoleSession", "consoleCsrf"), responses={200: ("The session", doc, (JSON,))},
               **common),
            Op("DELETE", SESSION_ROUTE, self._delete, "delete_console_session", "Sign out of the console",
               auth=self._session_auth, security=("consoleSession", "consoleCsrf"), write=True,
               responses={204: ("Signed out; the cookie is cleared", None, ())}, **common),
        ]

    SCHEMAS = {"ConsoleSession": {
        "type": "object", "additionalProperties": False,
        "required": ["csrf", "expires_at", "idle_expires_at", "idle_timeout"],
        "properties": {"csrf": {"type": "string", "description": f"send it as {CSRF_HEADER} with the cookie "
                                                                "(the same token the sign-in gave)"},
                       "expires_at": {"type": "string", "format": "date-time",
                                      "description": "the session ends then at the latest"},
                       "idle_expires_at": {"type": "string", "format": "date-time",
                                           "description": "... or then, without a request before"},
                       "idle_timeout": {"type": "integer", "description": "seconds"}}}}

    # -- the pages ----------------------------------------------------------------------------------

    def page(self, method: str, target: str, head, client: str) -> http1.Reply:
        """One request under /console (GET or HEAD; no body)."""
        path, _, query = target.partition("?")
        rest = path[len(PATH):]
        label = "-"
        if rest == "":
            label, reply = "redirect", http1.Reply(308, b"", headers=((b"Location", b"/console/"),) + PAGE_HEADERS)
        else:
            name = rest[1:]
            if name in PAGES:
                label = PAGES[name]
            elif name in ASSETS:
                label = name.rsplit("/", 1)[-1]
            if method not in ("GET", "HEAD"):
                reply = self._error(405, "this path takes GET, HEAD", ((b"Allow", b"GET, HEAD"),))
            elif query and _CREDENTIAL_PARAMS & {p.partition("=")[0].lower() for p in query.split("&")}:
                reply = self._error(400, "credentials never go in a URL: the console's sign-in page takes the key")
            elif name in PAGES:
                reply = http1.Reply(200, self.assets[SHELL], b"text/html; charset=utf-8", PAGE_HEADERS)
            elif name in ASSETS:
                reply = http1.Reply(200, self.assets[name], ASSETS[name].encode(), ASSET_HEADERS)
            else:
                reply = self._error(404, "no such page")
        self._count(label, method, reply.status, client)
        return reply

    def too_large(self, head, client: str) -> http1.Reply:
        reply = self._error(413, "the console's pages take no body")
        self._count("-", head.method.decode("latin-1"), 413, client)
        return reply

    @staticmethod
    def _error(status: int, text: str, headers: tuple = ()) -> http1.Reply:
        return http1.Reply(status, text.encode() + b"\n", headers=headers + PAGE_HEADERS)

    @staticmethod
    def _count(label: str, method: str, status: int, client: str) -> None:
        metrics.CONSOLE_REQUESTS.labels(label, str(status)).inc()
        if status >= 400:
            _LOG.info("console request refused", extra={"page": label, "method": method if method in (
                "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS") else "other", "status": status,
                "client": client})
