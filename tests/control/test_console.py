"""The web console's sessions and pages in-process (relayd.control.console,
docs/console.md): what makes a session, what ends it, what a request with
its cookie must also carry, and that /console/ serves its bundle and
nothing else. Through a real relay and browser: tests/api/test_console_routes.py
and tests/ops/test_console_browser.py."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest

from relayd.control import console
from relayd.control.api import Api, ApiError, Op, ok
from relayd.core import http1
from tests.metric import value

KEY = "rak_" + "k" * 43
HOST = "relay.example"


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class Keys:
    """The admin key as the store holds it: its hash, read per request."""

    def __init__(self) -> None:
        self.key = KEY

    def ok(self, k: str) -> bool:
        return k == self.key

    def hash(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


@pytest.fixture
def env():
    clock, keys = Clock(), Keys()
    c = console.Console(keys.ok, keys.hash, [HOST, "127.0.0.1"], console.ConsoleConfig(max_sessions=3), clock)
    api = Api(keys.ok, "t")
    api.add([Op("GET", "/admin/things", lambda req: ok({"actor": req.actor}), "things", "x", "t"),
             Op("POST", "/admin/secret", lambda req: ok({}), "secret", "x", "t", session=False)] + c.ops(),
            console.Console.SCHEMAS)
    api.accept_sessions(c.authorize, console.Console.SECURITY)
    return c, api, clock, keys


def head(method="GET", path="/", headers=(), host=HOST):
    return http1.RequestHead(method.encode(), path.encode(), b"HTTP/1.1",
                             [(b"Host", host.encode())] + [(k.encode(), v.encode()) for k, v in headers])


def call(api, method, path, headers=(), host=HOST, client="192.0.2.1"):
    target = "/api/v1" + path
    reply = api.handle(method, target, head(method, target, headers, host), b"", client)
    return reply.status, (http1_json(reply)), dict((k.decode().lower(), v.decode()) for k, v in reply.headers)


def http1_json(reply):
    import orjson

    return orjson.loads(reply.body) if reply.body else None


def sign_in(api, key=KEY, host=HOST, client="192.0.2.1"):
    status, doc, headers = call(api, "POST", "/admin/console/session", [("Authorization", f"Bearer {key}")], host,
                                client)
    assert status == 201, doc
    sid = headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    return sid, doc["csrf"], headers["set-cookie"]


def with_session(sid, csrf=None, **more):
    h = [("Cookie", f"other=1; {console.COOKIE}={sid}")]
    if csrf is not None:
        h.append((console.CSRF_HEADER, csrf))
    return h + list(more.items())


def refusals(reason):
    return value("relayd_console_auth_refusals_total", reason=reason)


def test_the_cookie_and_what_a_session_can_do(env):
    c, api, clock, keys = env
    sid, csrf, cookie = sign_in(api)
    assert cookie == (f"{console.COOKIE}={sid}; Path=/api/v1/admin; Max-Age=28800; Secure; HttpOnly; "
                      "SameSite=Strict")
    assert len(sid) == 43 and sid not in repr(c.sessions._by_digest)  # only its hash is kept
    status, doc, headers = call(api, "GET", "/admin/things", with_session(sid, csrf))
    assert status == 200 and doc == {"actor": "console"}
    # The same request with the key: the key's actor.
    assert call(api, "GET", "/admin/things", [("Authorization", f"Bearer {KEY}")])[1] == {"actor": "api"}
    # What takes the key itself refuses the session: the key's rotation, another session.
    status, doc, _ = call(api, "POST", "/admin/secret", with_session(sid, csrf))
    assert status == 401 and "Bearer" in doc["message"]
    status, doc, _ = call(api, "POST", "/admin/console/session", with_session(sid, csrf))
    assert status == 401
    status, doc, _ = call(api, "GET", "/admin/console/session", with_session(sid, csrf))
    assert status == 200 and doc["csrf"] == csrf and doc["idle_timeout"] == 1800
    # Sign out: the cookie is cleared and the session is gone.
    status, _, headers = call(api, "DELETE", "/admin/console/session", with_session(sid, csrf))
    assert status == 204 and "Max-Age=0" in headers["set-cookie"]
    status, doc, headers = call(api, "GET", "/admin/things", with_session(sid, csrf))
    assert status == 401 and doc["error"] == "unauthorized" and "www-authenticate" in headers


@pytest.mark.parametrize("case", [
    ("forged cookie", lambda sid, csrf: with_session("A" * 43, csrf), 401, "unknown"),
    ("no CSRF token", lambda sid, csrf: with_session(sid), 403, "no_csrf"),
    ("wrong CSRF token", lambda sid, csrf: with_session(sid, "B" * 43), 403, "bad_csrf"),
    ("the token of another session", lambda sid, csrf: with_session(sid, "OTHER"), 403, "bad_csrf"),
    ("a sibling host's page", lambda sid, csrf: with_session(sid, csrf, **{"Sec-Fetch-Site": "same-site"}), 403,
     "cross_site"),
    ("another origin", lambda sid, csrf: with_session(sid, csrf, Origin="https://evil.example"), 403, "cross_site"),
    ("an opaque origin", lambda sid, csrf: with_session(sid, csrf, Origin="null"), 403, "cross_site"),
], ids=lambda c: c[0])
def test_a_cookie_alone_is_not_enough(env, case, caplog):
    c, api, _, _ = env
    sid, csrf, _ = sign_in(api)
    if case[0] == "the token of another session":
        csrf_other = sign_in(api)[1]
        headers = with_session(sid, csrf_other)
    else:
        headers = case[1](sid, csrf)
    before = refusals(case[3])
    with caplog.at_level(logging.INFO):
        status, doc, _ = call(api, "GET", "/admin/things", headers)
    assert (status, set(doc)) == (case[2], {"error", "message"})
    assert refusals(case[3]) == before + 1
    lines = [r for r in caplog.records if r.getMessage() == "api request refused"]
    assert lines and lines[-1].status == case[2]
    assert sid not in caplog.text and csrf not in caplog.text
    # The session itself still holds: a refusal does not end it.
    assert call(api, "GET", "/admin/things", with_session(sid, csrf))[0] == 200


def test_same_origin_requests_pass(env):
    c, api, _, _ = env
    sid, csrf, _ = sign_in(api, host="127.0.0.1")
    headers = with_session(sid, csrf, **{"Sec-Fetch-Site": "same-origin", "Origin": "https://127.0.0.1:8443"})
    status, _, _ = call(api, "GET", "/admin/things", headers, host="127.0.0.1:8443")
    assert status == 200


def test_only_on_the_consoles_host_names(env):
    c, api, _, _ = env
    before = refusals("wrong_host")
    status, doc, _ = call(api, "POST", "/admin/console/session", [("Authorization", f"Bearer {KEY}")],
                          host="app.example")
    assert status == 403 and "not served on this host" in doc["message"]
    sid, csrf, _ = sign_in(api)
    assert call(api, "GET", "/admin/things", with_session(sid, csrf), host="app.example")[0] == 403
    assert refusals("wrong_host") == before + 2


def test_a_tossed_cookie_does_not_shadow_the_real_one(env):
    # A page of a sibling host may set a cookie of the same name for the
    # parent domain: the browser sends both.
    c, api, _, _ = env
    sid, csrf, _ = sign_in(api)
    headers = [("Cookie", f"{console.COOKIE}={'T' * 43}; {console.COOKIE}={sid}"), (console.CSRF_HEADER, csrf)]
    assert call(api, "GET", "/admin/things", headers)[0] == 200
    # An oversized value is not even looked up.
    assert console.cookies(head(headers=[("Cookie", f"{console.COOKIE}={'x' * 5000}")]), console.COOKIE) == []


def test_sessions_end(env):
    c, api, clock, keys = env
    sid, csrf, _ = sign_in(api)
    clock.t += 29 * 60  # within the idle time, each request starts it again
    assert call(api, "GET", "/admin/things", with_session(sid, csrf))[0] == 200
    clock.t += 31 * 60
    before = refusals("expired")
    status, doc, _ = call(api, "GET", "/admin/things", with_session(sid, csrf))
    assert status == 401 and "ended" in doc["message"] and refusals("expired") == before + 1
    # Used all along, it still ends after its lifetime.
    sid, csrf, _ = sign_in(api)
    for i in range(40):
        clock.t += 15 * 60
        if call(api, "GET", "/admin/things", with_session(sid, csrf))[0] != 200:
            break
    assert i == 32  # refused 8 h 15 min after the sign-in, not before
    # A rotation of the admin key ends every session made with the old one.
    sid, csrf, _ = sign_in(api)
    keys.key = "rak_" + "n" * 43
    before = refusals("key_rotated")
    assert call(api, "GET", "/admin/things", with_session(sid, csrf))[0] == 401
    assert refusals("key_rotated") == before + 1 and len(c.sessions) == 0


def test_too_many_sessions_end_the_least_recently_used(env):
    c, api, clock, _ = env
    made = []
    for _ in range(3):
        clock.t += 1
        made.append(sign_in(api)[:2])
    clock.t += 1
    assert call(api, "GET", "/admin/things", with_session(*made[0]))[0] == 200  # the first is used again
    sign_in(api)
    assert value("relayd_console_sessions") == 3
    assert call(api, "GET", "/admin/things", with_session(*made[1]))[0] == 401
    assert call(api, "GET", "/admin/things", with_session(*made[0]))[0] == 200


def test_failed_sign_ins_are_limited_per_address(env, caplog):
    c, api, _, _ = env
    wrong = [("Authorization", "Bearer rak_" + "w" * 43)]
    before = value("relayd_console_signins_total", result="wrong_key")
    with caplog.at_level(logging.INFO):
        for _ in range(10):
            assert call(api, "POST", "/admin/console/session", wrong, client="198.51.100.7")[0] == 401
    assert value("relayd_console_signins_total", result="wrong_key") == before + 10
    status, doc, headers = call(api, "POST", "/admin/console/session", wrong, client="198.51.100.7")
    assert status == 429 and int(headers["retry-after"]) > 0
    # Even the right key waits there; another address does not.
    assert call(api, "POST", "/admin/console/session", [("Authorization", f"Bearer {KEY}")],
                client="198.51.100.7")[0] == 429
    sign_in(api, client="198.51.100.8")
    assert "w" * 43 not in caplog.text and KEY not in caplog.text
    assert call(api, "POST", "/admin/console/session", [], client="198.51.100.9")[0] == 401


def test_the_document_describes_the_session(env):
    from openapi_spec_validator import validate

    _, api, _, _ = env
    doc = api.openapi()
    validate(doc)
    schemes = doc["components"]["securitySchemes"]
    assert schemes["consoleSession"] == {**schemes["consoleSession"], "type": "apiKey", "in": "cookie",
                                         "name": console.COOKIE}
    assert schemes["consoleCsrf"]["in"] == "header" and schemes["consoleCsrf"]["name"] == console.CSRF_HEADER
    paths = doc["paths"]
    assert paths["/api/v1/admin/things"]["get"]["security"] == [{"adminKey": []},
                                                                {"consoleSession": [], "consoleCsrf": []}]
    assert paths["/api/v1/admin/secret"]["post"]["security"] == [{"adminKey": []}]
    session = paths["/api/v1/admin/console/session"]
    assert session["post"]["security"] == [{"adminKey": []}] and "429" in session["post"]["responses"]
    assert session["get"]["security"] == session["delete"]["security"] == [{"consoleSession": [],
                                                                            "consoleCsrf": []}]


# -- the pages -------------------------------------------------------------------------------------


def page(c, path, method="GET", client="192.0.2.1"):
    return c.page(method, path, head(method, path), client)


@pytest.mark.parametrize("path", ["/console/", "/console/agents", "/console/endpoints", "/console/hybrid",
                                  "/console/users"])
def test_every_page_is_the_shell_with_strict_headers(env, path):
    c = env[0]
    before = value("relayd_console_requests_total", page=console.PAGES[path[len("/console/"):]], status="200")
    r = page(c, path)
    hdr = {k.decode().lower(): v.decode() for k, v in r.headers}
    assert r.status == 200 and r.content_type == b"text/html; charset=utf-8" and r.body.startswith(b"<!doctype html>")
    csp = dict(d.strip().split(" ", 1) for d in hdr["content-security-policy"].split(";"))
    assert csp["script-src"] == "'self'" and csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert csp["require-trusted-types-for"] == "'script'" and "unsafe" not in hdr["content-security-policy"]
    assert hdr["x-frame-options"] == "DENY" and hdr["cache-control"] == "no-store"
    assert hdr["x-content-type-options"] == "nosniff" and hdr["referrer-policy"] == "no-referrer"
    assert b"<script>" not in r.body and not re.search(rb"\son[a-z]+\s*=", r.body)  # no inline script or handler
    assert value("relayd_console_requests_total", page=console.PAGES[path[len("/console/"):]], status="200") == before + 1


def test_the_bundle_and_nothing_else(env, caplog):
    c = env[0]
    js = page(c, "/console/static/console.js")
    assert js.status == 200 and js.content_type == b"text/javascript; charset=utf-8"
    assert b"innerHTML" not in js.body.replace(b"an innerHTML here", b"") and b"eval(" not in js.body
    assert page(c, "/console/static/console.css").content_type == b"text/css; charset=utf-8"
    assert page(c, "/console/static/icon.svg").status == 200
    r = page(c, "/console")
    assert r.status == 308 and (b"Location", b"/console/") in r.headers
    with caplog.at_level(logging.INFO):
        for path in ["/console/index.html", "/console/static/", "/console/static", "/console/static/../index.html",
                     "/console/static/%2e%2e/%2e%2e/admin-api.key", "/console/../admin-api.key", "/console/agents/",
                     "/console/static/console.js.map", "/console/static/console.js/x", "/console/" + "a" * 5000]:
            r = page(c, path)
            assert r.status == 404, path
            assert (b"Content-Security-Policy", console.CSP.encode()) in r.headers
    assert "console request refused" in caplog.text
    r = page(c, "/console/agents", method="POST")
    assert r.status == 405 and (b"Allow", b"GET, HEAD") in r.headers
    assert page(c, "/console/?key=" + KEY).status == 400
    assert page(c, "/console/?page=2").status == 200
    before = value("relayd_console_requests_total", page="-", status="413")
    assert c.too_large(head("POST", "/console/"), "192.0.2.1").status == 413
    assert value("relayd_console_requests_total", page="-", status="413") == before + 1
    assert KEY not in caplog.text


def test_the_script_builds_no_html_from_text():
    # Every value reaches the DOM through text nodes and attributes: the
    # script never parses HTML, never makes a URL from data, never runs text.
    js = console.load_assets()["static/console.js"].decode()
    code = "\n".join(line for line in js.splitlines() if not line.lstrip().startswith("//"))
    for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                "setAttribute(\"href\"", "localStorage", "javascript:"):
        assert bad not in code, bad


def test_hybrid_connection_paths_of_the_relay_are_refused():
    from relayd.control.hybrid import check_path
    from relayd.errors import ConfigError

    for p in ("console", "console/x", "api/v1", "API/V1/admin/users"):
        with pytest.raises(ConfigError, match="the relay's own"):
            check_path(p)
    assert check_path("consoles") == "consoles" and check_path("api/v2") == "api/v2"


def test_an_api_error_from_the_session_is_an_api_error(env):
    c = env[0]
    with pytest.raises(ApiError) as exc:
        c.session_of(head(headers=[("Cookie", f"{console.COOKIE}=zzz")]))
    assert exc.value.status == 401
    assert c.session_of(head()) is None
