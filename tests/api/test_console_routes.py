"""The web console's routes against a real `relayd serve` process on
loopback (docs/console.md): its pages under /console/ and the session
exchange under /api/v1/admin/console/session, attacked while a bystander's
stream runs through another agent. Each hostile request gets its status,
is counted (relayd_api_requests_total, relayd_console_*, or the front
door's relayd_http_error_responses_total) and logged, and no log line
holds the key, a session id, a CSRF token or the request's marker. The
browser itself: tests/ops/test_console_browser.py."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from relayd.control import console
from tests.api.test_cli_remote import MARKER, Remote
from tests.waiting import until_sync

pytestmark = pytest.mark.once

SESSION = "/api/v1/admin/console/session"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Remote(tmp_path_factory.mktemp("console"))
    r.secrets = {r.key}
    r.bystander = next(a["id"] for a in api(r, "/api/v1/admin/agents")["items"] if a["status"] == "online")
    yield r
    r.intact()
    err = r.stop()
    assert "Traceback" not in err, err[-3000:]
    assert MARKER not in err
    for s in r.secrets:
        assert s not in err, "a secret reached the relay's log"


def request(relay, method, path, body=None, headers=None):
    c = http.client.HTTPSConnection("127.0.0.1", relay.ports["https"],
                                    context=ssl.create_default_context(cafile=relay.ca), timeout=15)
    try:
        c.request(method, path, body, headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def api(relay, path: str) -> dict:
    status, _, body = request(relay, "GET", path, headers={"Authorization": f"Bearer {relay.key}"})
    assert status == 200, body
    return json.loads(body)


def log_lines(relay) -> list[dict]:
    out = []
    for line in relay.log().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def sign_in(relay) -> tuple[str, str]:
    status, headers, body = request(relay, "POST", SESSION, headers={"Authorization": f"Bearer {relay.key}"})
    assert status == 201, body
    sid = headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    csrf = json.loads(body)["csrf"]
    relay.secrets |= {sid, csrf}
    return sid, csrf


def cookie(sid: str, csrf: str | None = None, **more) -> dict:
    h = {"Cookie": f"{console.COOKIE}={sid}"}
    if csrf is not None:
        h[console.CSRF_HEADER] = csrf
    return {**h, **more}


def count(relay, name: str, **labels) -> float:
    return relay.metric(name, **labels)


def test_sign_in_and_use_the_session(relay):
    sid, csrf = sign_in(relay)
    status, headers, body = request(relay, "GET", "/api/v1/admin/agents", headers=cookie(sid, csrf))
    assert status == 200 and headers["cache-control"] == "no-store"
    assert any(a["status"] == "online" for a in json.loads(body)["items"])
    status, headers, body = request(relay, "GET", SESSION, headers=cookie(sid, csrf))
    assert status == 200 and json.loads(body)["csrf"] == csrf
    # The audit line names the console's session by a handle, never by its id.
    status, _, body = request(relay, "POST", "/api/v1/admin/join-tokens", b"{}",
                              cookie(sid, csrf, **{"Content-Type": "application/json"}))
    assert status == 201
    relay.secrets.add(json.loads(body)["token"])
    until_sync(lambda: [ln for ln in log_lines(relay) if ln["msg"] == "admin api write" and ln.get("actor") ==
                        "console" and ln.get("action") == "create_join_token"], 5, "no audit line of the console")
    status, headers, _ = request(relay, "DELETE", SESSION, headers=cookie(sid, csrf))
    assert status == 204 and "Max-Age=0" in headers["set-cookie"]
    assert request(relay, "GET", "/api/v1/admin/agents", headers=cookie(sid, csrf))[0] == 401
    relay.intact()


def test_pages_are_served_with_their_headers(relay):
    for path in ("/console/", "/console/agents", "/console/endpoints", "/console/hybrid", "/console/users"):
        status, headers, body = request(relay, "GET", path)
        assert status == 200 and body.startswith(b"<!doctype html>"), path
        assert headers["content-security-policy"] == console.CSP and headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
    status, headers, body = request(relay, "HEAD", "/console/static/console.js")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/javascript")
    status, headers, _ = request(relay, "GET", "/console")
    assert status == 308 and headers["location"] == "/console/"
    relay.intact()


# (what, method, path, body, headers: a function of (relay, sid, csrf), status, metric: (name, labels)); the
# log line: the API's "api request refused", the console's "console request refused", or the front door's "http NNN".
API_ROUTE = {"route": "/admin/console/session"}
HOSTILE = [
    ("wrong key at sign-in", "POST", SESSION, None, lambda r, s, c: {"Authorization": f"Bearer rak_{MARKER}"}, 401,
     ("relayd_console_signins_total", {"result": "wrong_key"})),
    ("no key at sign-in", "POST", SESSION, None, lambda r, s, c: {}, 401,
     ("relayd_console_signins_total", {"result": "no_key"})),
    ("a session for a session", "POST", SESSION, None, lambda r, s, c: cookie(s, c), 401,
     ("relayd_console_signins_total", {"result": "no_key"})),
    ("oversized body at sign-in", "POST", SESSION, b"k" * (3 << 20),
     lambda r, s, c: {"Authorization": f"Bearer {r.key}", "Content-Type": "application/json"}, 413,
     ("relayd_api_requests_total", {**API_ROUTE, "method": "POST", "status": "413"})),
    ("a body at sign-in", "POST", SESSION, b'{"key": "' + MARKER.encode() + b'"}',
     lambda r, s, c: {"Authorization": f"Bearer {r.key}", "Content-Type": "application/json"}, 400,
     ("relayd_api_requests_total", {**API_ROUTE, "method": "POST", "status": "400"})),
    ("missing cookie", "GET", SESSION, None, lambda r, s, c: {console.CSRF_HEADER: c}, 401,
     ("relayd_console_auth_refusals_total", {"reason": "no_cookie"})),
    ("forged cookie", "GET", "/api/v1/admin/agents", None, lambda r, s, c: cookie("F" * 43, c), 401,
     ("relayd_console_auth_refusals_total", {"reason": "unknown"})),
    ("CSRF: revoke without the header", "POST", "/api/v1/admin/agents/BYSTANDER/revoke", None,
     lambda r, s, c: cookie(s), 403, ("relayd_console_auth_refusals_total", {"reason": "no_csrf"})),
    ("CSRF: a form's join token", "POST", "/api/v1/admin/join-tokens", b"ttl=1h",
     lambda r, s, c: cookie(s, **{"Content-Type": "application/x-www-form-urlencoded"}), 403,
     ("relayd_console_auth_refusals_total", {"reason": "no_csrf"})),
    ("CSRF: a wrong token", "DELETE", "/api/v1/admin/hybrid-connections/orders", None,
     lambda r, s, c: cookie(s, "W" * 43), 403, ("relayd_console_auth_refusals_total", {"reason": "bad_csrf"})),
    ("a sibling site's request", "POST", "/api/v1/admin/agents/BYSTANDER/revoke", None,
     lambda r, s, c: cookie(s, c, **{"Sec-Fetch-Site": "same-site"}), 403,
     ("relayd_console_auth_refusals_total", {"reason": "cross_site"})),
    ("another origin", "GET", "/api/v1/admin/agents", None,
     lambda r, s, c: cookie(s, c, Origin="https://evil.example"), 403,
     ("relayd_console_auth_refusals_total", {"reason": "cross_site"})),
    ("a console session rotates the key", "POST", "/api/v1/admin/api-key/rotate", None, lambda r, s, c: cookie(s, c),
     401, ("relayd_api_requests_total", {"route": "/admin/api-key/rotate", "method": "POST", "status": "401"})),
    ("a key in a console URL", "GET", f"/console/?key=rak_{MARKER}", None, lambda r, s, c: {}, 400,
     ("relayd_console_requests_total", {"page": "overview", "status": "400"})),
    ("oversized body to a page", "GET", "/console/agents", b"x" * (64 << 10), lambda r, s, c: {}, 413,
     ("relayd_console_requests_total", {"page": "-", "status": "413"})),
    ("a method pages do not take", "PUT", "/console/agents", None, lambda r, s, c: {}, 405,
     ("relayd_console_requests_total", {"page": "agents", "status": "405"})),
    ("a file that is not in the bundle", "GET", "/console/admin-api.key", None, lambda r, s, c: {}, 404,
     ("relayd_console_requests_total", {"page": "-", "status": "404"})),
    ("a NUL after an asset", "GET", "/console/static/console.js%00", None, lambda r, s, c: {}, 404,
     ("relayd_console_requests_total", {"page": "-", "status": "404"})),
    ("traversal to the data directory", "GET", "/console/../../../admin-api.key", None, lambda r, s, c: {}, 400,
     ("relayd_http_error_responses_total", {"status": "400"})),
    ("traversal with an encoded slash", "GET", "/console/static/..%2f..%2fadmin-api.key", None,
     lambda r, s, c: {}, 400, ("relayd_http_error_responses_total", {"status": "400"})),
    ("traversal with a parameter", "GET", "/console/static/..;/..;/admin-api.key", None, lambda r, s, c: {}, 400,
     ("relayd_http_error_responses_total", {"status": "400"})),
    ("encoded dots out of the console", "GET", "/console/static/%2e%2e/%2e%2e/etc/passwd", None,
     lambda r, s, c: {}, 404, ("relayd_http_error_responses_total", {"status": "404"})),
    ("dots into the API", "GET", "/console/static/../../api/v1/admin/agents", None, lambda r, s, c: {}, 401,
     ("relayd_api_requests_total", {"route": "/admin/agents", "method": "GET", "status": "401"})),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_refused_counted_and_logged(relay, case):
    what, method, path, body, headers, status, (metric, labels) = case
    sid, csrf = sign_in(relay)
    path = path.replace("BYSTANDER", relay.bystander)
    before = count(relay, metric, **labels)
    got, hdrs, data = request(relay, method, path, body, headers(relay, sid, csrf))
    assert got == status, (what, data[:300])
    if hdrs.get("content-type", "").startswith("application/json"):
        err = json.loads(data)
        assert set(err) == {"error", "message"} and MARKER not in err["message"]
    until_sync(lambda: count(relay, metric, **labels) >= before + 1, 5, f"{what}: not counted in {metric}")
    # (Refusal lines are rate limited per template: one of its kind must be there.)
    msg = ("http " + str(status) if metric == "relayd_http_error_responses_total" else "console request refused"
           if metric == "relayd_console_requests_total" else "api request refused")
    until_sync(lambda: [ln for ln in log_lines(relay) if ln["msg"] == msg], 5, f"no log line {msg!r}")
    # The session survives refusals of requests that carried it, and the bystander agent was never revoked.
    assert request(relay, "GET", SESSION, headers=cookie(sid, csrf))[0] == 200
    assert api(relay, f"/api/v1/admin/agents/{relay.bystander}")["status"] == "online"
    relay.intact()


def test_the_console_is_refused_where_an_agent_serves_pages(tmp_path):
    # A relay name that also carries an HTTP endpoint would put an agent's
    # pages on the console's origin: neither the console nor its sessions there.
    from tests.tunnel.processes import Proc, free_port, wait_port

    https = free_port()
    data = tmp_path / "relay"
    p = Proc(["serve", "--data", str(data), "--agents", f"127.0.0.1:{free_port()}", "--https", f"127.0.0.1:{https}",
              "--hostname", "relay.test", "--http", "web=localhost/"])
    try:
        wait_port(https)
        key = (data / "admin-api.key").read_text().strip()
        ctx = ssl.create_default_context(cafile=str(data / "ca" / "ca.crt"))

        def ask(host, method, path, headers=None):
            c = http.client.HTTPSConnection("127.0.0.1", https, context=ctx, timeout=15)
            c.request(method, path, headers={"Host": host, **(headers or {})})
            r = c.getresponse()
            out = r.status, r.read()
            c.close()
            return out

        assert ask("127.0.0.1", "GET", "/console/")[0] == 200
        assert ask("localhost", "GET", "/console/")[0] == 503  # the endpoint's: no agent serves it
        status, body = ask("localhost", "POST", SESSION, {"Authorization": f"Bearer {key}"})
        assert status == 403 and b"not served on this host name" in body
        assert ask("127.0.0.1", "POST", SESSION, {"Authorization": f"Bearer {key}"})[0] == 201
    finally:
        err = p.stop()[1]
    assert "the web console is not served on localhost" in err and key not in err
