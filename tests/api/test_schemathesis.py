"""The REST API fuzzed by an independent tool (schemathesis) against a real
`relayd serve` process, from the OpenAPI document that process serves at
/api/v1/openapi.json (docs/api.md, "How the API is fuzzed").

Every operation of the document is called with cases schemathesis makes
from its schemas, positive (valid by the document) and negative (not),
with the credential its security scheme names:

- adminKey: the admin key the relay wrote to ``admin-api.key``;
- userToken: a local user's token, from ``POST /users/token`` after the
  admin API added the user;
- deviceToken: a device token for a real device, a `relayd agent --otp
  --est` process enrolled with an OTP from the admin API and connected.
  The relay pushes its tokens down that tunnel into the agent's memory,
  out of a test's reach, so the test signs one with the relay's own
  ``device-signing.key`` (what the relay does at the push);
- proxyToken: that user's proxy token from ``POST /token``;
- consoleSession (with consoleCsrf): a web console session, from ``POST
  /admin/console/session`` with the admin key: its cookie and CSRF token.

No operation is skipped. Every answer must be no 5xx (``not_a_server_error``)
and conform to the document: a documented status, its content type, its body
schema (schemathesis' ``status_code_conformance``,
``content_type_conformance``, ``response_schema_conformance``). Then again
without any credential: every protected operation answers 401 with the
``Error`` body, never 5xx.

Bounded for CI: hypothesis derandomized (the same cases at every run) with
MAX_EXAMPLES per operation and mode, no shrinking; the user's and device's
operations run before the admin ones (which may delete the user or revoke
everything). A longer session by hand: docs/api.md."""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.parse
import urllib.request

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from relayd.control import console, devicegw
from tests.tunnel.processes import Proc, free_port, wait_port
from tests.waiting import until_sync

# The API's document and handlers are the same in both builds: fuzzed once (the compiled pass).
pytestmark = pytest.mark.once

API = "/api/v1"
MAX_EXAMPLES = int(os.environ.get("RELAYD_FUZZ_EXAMPLES", "6"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
PASSWORD = "correct horse battery"
#: The user's and the device's operations first: the admin's may remove them.
ORDER = {"proxyToken": 0, "deviceToken": 1, "userToken": 2, None: 3, "consoleSession": 4, "adminKey": 5}


class Relay:
    """`relayd serve` with its HTTPS port, and one device: a `relayd agent`
    enrolled over EST with an OTP, its tunnel up."""

    def __init__(self, tmp) -> None:
        self.tmp, self.agent = tmp, None
        self.data = tmp / "relay"
        self.port = free_port()
        self.base = f"https://127.0.0.1:{self.port}"
        self.relay = Proc(["serve", "--data", str(self.data), "--agents", f"127.0.0.1:{free_port()}",
                           "--https", f"127.0.0.1:{self.port}", "--hostname", "relay.example"])
        try:
            wait_port(self.port)
            self.ca = str(self.data / "ca" / "ca.crt")
            self.key = (self.data / "admin-api.key").read_text().strip()
            self.http = self.session()
            otp = self.call("POST", "/admin/otps", {"device_name": "cam"}, self.key, 201)
            self.agent = Proc(["agent", "--data", str(tmp / "dev"), "--otp", otp["otp"], "--est", self.base,
                               "--pin", otp["ca_sha256"], "--endpoint", "web=127.0.0.1:9"])
            ident = tmp / "dev" / "identity.json"
            until_sync(lambda: ident.exists(), 30, "the device did not enroll")
            self.device_id = json.loads(ident.read_text())["agent_id"]
            self.call("POST", "/admin/users", {"username": "fuzz", "password": PASSWORD}, self.key, 201)
            user = self.call("POST", "/users/token", {"username": "fuzz", "password": PASSWORD}, None, 200)["token"]
            device = devicegw.DeviceTokens(devicegw.load_or_create_key(self.data)).issue(self.device_id)[0]
            proxy = self.call("POST", "/token", {}, user, 200)["token"]
            signin = self.http.post(self.base + API + "/admin/console/session", timeout=15,
                                    headers={"Authorization": f"Bearer {self.key}"})
            assert signin.status_code == 201, signin.text[:300]
            self.console = {"Cookie": f"{console.COOKIE}={signin.cookies[console.COOKIE]}",
                            console.CSRF_HEADER: signin.json()["csrf"]}
            self.http.cookies.clear()
            self.creds = {"adminKey": self.key, "userToken": user, "deviceToken": device, "proxyToken": proxy}
            # The device's tunnel is up: a device token is good now.
            until_sync(lambda: self.status("POST", "/device/notifications", {"type": "t"}, device) == 202, 30,
                       "the device token is refused")
        except BaseException:
            print(self.stop()[-3000:])
            raise

    def auth(self, scheme: str | None) -> dict:
        """The headers of the credential a security scheme names."""
        if scheme is None:
            return {}
        return dict(self.console) if scheme == "consoleSession" else {"Authorization": f"Bearer {self.creds[scheme]}"}

    def session(self) -> requests.Session:
        s = requests.Session()
        s.verify = self.ca
        s.trust_env = False  # no proxy, and no REQUESTS_CA_BUNDLE in place of the relay's CA
        return s

    def status(self, method, path, doc, cred) -> int:
        h = {"Authorization": f"Bearer {cred}"} if cred else {}
        return self.http.request(method, self.base + API + path, json=doc, headers=h, timeout=15).status_code

    def call(self, method, path, doc, cred, want):
        h = {"Authorization": f"Bearer {cred}"} if cred else {}
        r = self.http.request(method, self.base + API + path, json=doc, headers=h, timeout=15)
        assert r.status_code == want, (method, path, r.status_code, r.text[:300])
        return r.json()

    def document(self) -> dict:
        ctx = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(self.base + API + "/openapi.json", context=ctx, timeout=15) as r:
            return json.loads(r.read())

    def stop(self) -> str:
        out = ""
        for p in (self.agent, self.relay):
            if p is not None:
                out += p.stop()[1]
        return out


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(tmp_path_factory.mktemp("fuzzapi"))
    yield r
    err = r.stop()
    assert "Traceback" not in err, err[-3000:]
    for cred in r.creds.values():
        assert cred not in err, "a credential reached a log"


def scheme_of(operation) -> str | None:
    security = operation.definition.raw.get("security") or [{}]
    return next(iter(security[0]), None)


def front_door_refuses(value) -> bool:
    """A path parameter the HTTPS front door refuses before the API
    (docs/security.md, "Paths"): a slash or backslash, a dot segment."""
    v = urllib.parse.unquote(str(value))  # (the case holds them as sent, encoded)
    return "/" in v or "\\" in v or (v[:1] == "." and v.split(";", 1)[0] in (".", ".."))


def fuzz(schema, run, examples: int = MAX_EXAMPLES) -> list[str]:
    """``run(case, scheme)`` on ``examples`` cases per operation and mode;
    the failures of every operation (not only the first)."""
    failures = []
    ops = [r.ok() for r in schema.get_all_operations()]
    ops.sort(key=lambda op: ORDER[scheme_of(op)])
    for op in ops:
        scheme = scheme_of(op)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def one(case):
                run(case, scheme)

            try:
                one()
            except Unsatisfiable:
                pass  # nothing to make invalid (an operation without parameters or body): no negative case
            except (Exception, BaseExceptionGroup) as exc:  # each operation's failure reported
                failures.append(f"{op.label} ({mode.value}): {exc}"[:3000])
    return failures


def load(relay: Relay):
    return schemathesis.openapi.from_dict(relay.document())


def test_every_operation_with_its_credential(relay):
    started = time.monotonic()
    session = relay.session()
    calls = []

    def run(case, scheme):
        headers = relay.auth(scheme)
        response = case.call(base_url=relay.base, session=session, headers=headers, timeout=15, verify=relay.ca)
        calls.append(response.status_code)
        if case.operation.path == API + "/admin/api-key/rotate" and response.status_code == 200:
            # The admin key it made is the only good one now.
            relay.key = relay.creds["adminKey"] = response.json()["key"]
        case.validate_response(response, checks=CHECKS, headers=headers)

    failures = fuzz(load(relay), run)
    assert not failures, "\n\n".join(failures)
    # The credentials worked: most operations answered something other than 401.
    assert sum(s != 401 for s in calls) > len(calls) // 2, sorted(set(calls))
    print(f"{len(calls)} calls in {time.monotonic() - started:.1f} s")


def test_without_credentials_every_protected_operation_answers_401(relay):
    session = relay.session()
    seen = []

    def run(case, scheme):
        if case.meta.generation.mode != GenerationMode.POSITIVE:
            return  # (a negative case may be refused earlier: a bad query is 400 before any key)
        response = case.call(base_url=relay.base, session=session, timeout=15, verify=relay.ca)
        case.validate_response(response, checks=CHECKS)
        if scheme is not None:
            seen.append(case.operation.label)
            if any(map(front_door_refuses, (case.path_parameters or {}).values())):
                # the HTTPS front door refuses the path before the API looks for a key
                assert response.status_code == 400 and response.headers["content-type"][0].startswith("text/plain")
                return
            assert response.status_code == 401, (case.operation.label, case.path_parameters, response.status_code, response.text[:200])
            assert set(response.json()) == {"error", "message"}

    failures = fuzz(load(relay), run, max(2, MAX_EXAMPLES // 2))
    assert not failures, "\n\n".join(failures)
    assert len(set(seen)) >= 50


def test_a_document_that_lies_fails_the_run(relay):
    # The checks do find faults: the same run against a document that
    # promises another body for GET /users/me fails.
    document = relay.document()
    document["components"]["schemas"]["UserProfile"]["required"].append("shoe_size")
    schema = schemathesis.openapi.from_dict(document).include(path=API + "/users/me")
    session = relay.session()

    def run(case, scheme):
        headers = {"Authorization": f"Bearer {relay.creds[scheme]}"}
        response = case.call(base_url=relay.base, session=session, headers=headers, timeout=15, verify=relay.ca)
        case.validate_response(response, checks=CHECKS, headers=headers)

    failures = fuzz(schema, run)
    assert failures and "shoe_size" in failures[0]


def test_what_the_command_line_session_found(relay):
    # schemathesis' coverage phase (docs/api.md, by hand) put a user in a
    # group named with a private-use character: the directory refuses it
    # with 422 (str.isprintable), which the route did not document.
    document = relay.document()
    group = "lab\U000f0000"
    path = f"/admin/groups/{urllib.parse.quote(group)}/members/local/fuzz"
    for method in ("PUT", "DELETE"):
        r = relay.http.request(method, relay.base + API + path, headers={"Authorization": f"Bearer {relay.key}"},
                               timeout=15)
        assert r.status_code == 422 and r.json()["error"] == "invalid", (method, r.status_code, r.text)
        op = document["paths"][API + "/admin/groups/{group}/members/{provider}/{username}"][method.lower()]
        assert "422" in op["responses"]
