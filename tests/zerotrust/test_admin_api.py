"""The REST admin API (/api/v1, docs/api.md) against a real `relayd serve`
process and a real site agent: its OpenAPI document (valid OpenAPI 3.1, the
same routes as the server dispatches on, answers that match it), CRUD round
trips that change what a live user may reach, key rotation from another
process, and hostile requests, each refused with its status and counted,
while a bystander's zero-trust flow (a `relayd connect` process) and a TCP
stream through the agent go on untouched. No key and no request payload
may reach the relay's log."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import os
import re
import socket
import ssl
import stat
import subprocess
import threading
import time
import tomllib

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from relayd.client import zerotrust as zc
from relayd.net import run
from tests.adversarial.stack import EchoHandler, HttpService, Stack, _Server, echo_round
from tests.tunnel.processes import RELAYD, Proc, cli, free_port, wait_port
from tests.waiting import listening, until, until_sync
from tests.zerotrust.test_revocation import _cut_within

MARKER = "PAYLOAD-9c2e51"
PASSWORD = "correct horse battery"
#: Services behind the agent, on their own loopback addresses.
ADDRS = {"a": "127.0.0.4", "b": "127.0.0.3", "bystander": "127.0.0.2"}
API = "/api/v1"


def _serve(addr, handler):
    srv = _Server((addr, 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Relay:
    """relayd serve (gateway of site s-lab, HTTPS, metrics, a TCP endpoint,
    an HTTP endpoint on app.example) and relayd agent of the site, as
    processes."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.services = {k: _serve(a, EchoHandler) for k, a in ADDRS.items()}
        self.services["echo"] = _serve("127.0.0.1", EchoHandler)
        self.services["web"] = _serve("127.0.0.1", HttpService)
        HttpService.requests = []
        self.ports = {k: free_port() for k in ("agents", "https", "metrics", "echo")}
        self.data = tmp / "relay"
        self.relay = Proc(["serve", "--data", str(self.data), "--agents", f"127.0.0.1:{self.ports['agents']}",
                           "--https", f"127.0.0.1:{self.ports['https']}", "--hostname", "relay.example",
                           "--metrics", f"127.0.0.1:{self.ports['metrics']}", "--site", "s-lab",
                           "--tcp", f"echo=127.0.0.1:{self.ports['echo']}", "--http", "web=app.example"])
        self.agent = None
        try:
            wait_port(self.ports["https"])
            wait_port(self.ports["metrics"])
            token = cli("admin", "join-token", "--data", str(self.data)).stdout.strip()
            self.agent = Proc(["agent", "--data", str(tmp / "agent"), "--join", token, "--site", "s-lab=127.0.0.0/8",
                               "--endpoint", f"echo=127.0.0.1:{self.services['echo'].server_address[1]}",
                               "--endpoint", f"web=127.0.0.1:{self.services['web'].server_address[1]}"])
            until_sync(lambda: self.metric("relayd_active_listeners") >= 1, 30, "the agent did not connect",
                       ignore=(OSError,))
        except BaseException:
            self.stop()
            raise
        self.key = (self.data / "admin-api.key").read_text().strip()
        self.ctx = ssl.create_default_context(cafile=str(self.data / "ca" / "ca.crt"))

    def port_of(self, key: str) -> int:
        return self.services[key].server_address[1]

    def stop(self) -> str:
        out = ""
        for p in (self.agent, self.relay):
            if p is not None:
                out += p.stop()[1]
        for srv in self.services.values():
            srv.shutdown()
            srv.server_close()
        return out

    def log(self) -> str:
        self.relay.err.seek(0, os.SEEK_SET)
        text = self.relay.err.read().decode()
        self.relay.err.seek(0, os.SEEK_END)
        return text

    metrics = Stack.metrics  # (they read self.ports["metrics"])
    metric = Stack.metric

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            host: str | None = None) -> tuple[int, dict, bytes]:
        c = http.client.HTTPSConnection("127.0.0.1", self.ports["https"], context=self.ctx, timeout=15)
        try:
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            c.putheader("Host", host or f"127.0.0.1:{self.ports['https']}")
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            if body is not None:
                c.putheader("Content-Length", str(len(body)))
            c.endheaders(body)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def call(self, method: str, path: str, doc=None, key: str | None = "", headers: dict | None = None):
        """An admin call: (status, parsed JSON or None, headers)."""
        h = {"Authorization": f"Bearer {self.key if key == '' else key}"} if key is not None else {}
        body = None
        if doc is not None:
            body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        status, rh, data = self.raw(method, API + path, body, h)
        parsed = json.loads(data) if data and rh.get("content-type", "").startswith("application/json") else None
        return status, parsed, rh


class Bystanders:
    """Someone else's traffic the whole time: carol's zero-trust flow
    through a `relayd connect -L` process, and a TCP stream through the
    agent's echo endpoint; every byte checked."""

    def __init__(self, r: Relay) -> None:
        self.r = r
        self.errors: list[str] = []
        self.count = {"zt": 0, "tcp": 0}
        self._stop = threading.Event()
        data = r.tmp / "carol"
        login = subprocess.run(RELAYD + ["login", f"https://127.0.0.1:{r.ports['https']}", "--user", "carol",
                                         "--password-stdin", "--ca", str(r.data / "ca" / "ca.crt"), "--data",
                                         str(data)], input=PASSWORD + "\n", capture_output=True, text=True,
                               timeout=60)
        assert login.returncode == 0, login.stderr
        self.lport = free_port()
        self.connect = Proc(["connect", "--data", str(data), "--socks", f"127.0.0.1:{free_port()}", "-L",
                             f"127.0.0.1:{self.lport}:{ADDRS['bystander']}:{r.port_of('bystander')}"])
        try:
            wait_port(self.lport, 30)
        except BaseException:
            print(self.connect.stop())
            raise
        self.threads = [threading.Thread(target=self._pump, args=("zt", self.lport), daemon=True),
                        threading.Thread(target=self._pump, args=("tcp", r.ports["echo"]), daemon=True)]
        for t in self.threads:
            t.start()
        until_sync(lambda: all(self.count.values()) or self.errors, 15, "the bystanders never got going")
        assert not self.errors, self.errors

    def _pump(self, what: str, port: int) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=15)
            while not self._stop.is_set():
                echo_round(s, 16 * 1024, what)
                self.count[what] += 1
                time.sleep(0.01)  # kept: paces the bystanders (steady, not a CPU hog)
            s.close()
        except Exception as exc:
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        before = dict(self.count)
        until_sync(lambda: all(self.count[k] > before[k] for k in before) or self.errors, 15,
                   "a bystander stalled")
        assert not self.errors, self.errors

    def stop(self) -> str:
        self._stop.set()
        for t in self.threads:
            t.join(10)
        return self.connect.stop()[1]


POLICY = {
    "sites": [{"id": "s-lab", "networks": ["127.0.0.0/8"]}],
    "entitlements": [
        {"id": "e-a", "site": "s-lab", "tags": ["lab"],
         "actions": [{"action": "allow", "proto": "tcp", "hosts": [ADDRS["a"]], "ports": ["1024-65535"]}]},
        {"id": "e-by", "site": "s-lab",
         "actions": [{"action": "allow", "proto": "tcp", "hosts": [ADDRS["bystander"]], "ports": ["1024-65535"]}]},
    ],
    "policies": [
        {"id": "p-staff", "match": {"criteria": [{"claim": "user.groups", "op": "contains", "value": "staff"}]},
         "entitlement_tags": ["lab"]},
        {"id": "p-by", "match": {"criteria": [{"claim": "user.groups", "op": "contains", "value": "bystanders"}]},
         "entitlements": ["e-by"]},
    ],
}


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    r = Relay(tmp_path_factory.mktemp("adminapi"))
    r.keys_seen = {r.key}
    try:
        # The policy and the users go in through the API itself.
        assert r.call("PUT", "/admin/policy", POLICY)[0] == 200
        for name, group in (("alice", "staff"), ("carol", "bystanders")):
            st, doc, _ = r.call("POST", "/admin/users", {"username": name, "password": PASSWORD, "groups": [group]})
            assert st == 201, doc
        r.document = r.raw("GET", API + "/openapi.json")[2]
        r.bystanders = Bystanders(r)
    except BaseException:
        print(r.stop()[-3000:])
        raise
    yield r
    by_err = r.bystanders.stop()
    err = r.stop()
    for who, text in (("relay", err), ("connect", by_err)):
        assert "Traceback" not in text, f"{who} printed a traceback:\n{text[-3000:]}"
        assert MARKER not in text, f"request payload reached the {who}'s log"
    for key in r.keys_seen:
        assert key not in err, "an admin key reached the relay's log"


@pytest.fixture
def unharmed(relay):
    yield
    relay.bystanders.check()


def doc_of(relay) -> dict:
    return json.loads(relay.document)


def conforms(document: dict, method: str, template: str, status: int, body) -> None:
    """``body`` matches what the document says ``method template`` answers
    with ``status``."""
    op = document["paths"][API + template][method.lower()]
    resp = op["responses"][str(status)]
    if "content" not in resp:
        assert body is None, f"{method} {template} {status}: documented without a body"
        return
    schema = dict(resp["content"]["application/json"]["schema"], components=document["components"])
    errors = sorted(Draft202012Validator(schema).iter_errors(body), key=str)
    assert not errors, f"{method} {template} {status}: {errors[0].message} at {list(errors[0].absolute_path)}"


# -- the document -------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(relay, unharmed):
    document = doc_of(relay)
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)
    # The validator does find faults (so that the line above can fail).
    for spoil in (lambda d: d["paths"][API + "/admin/users"]["get"]["responses"]["200"].pop("description"),
                  lambda d: d["paths"][API + "/admin/users/{provider}/{username}"]["get"].pop("parameters"),
                  lambda d: d["components"]["schemas"]["User"].update(type="objekt")):
        broken = copy.deepcopy(document)
        spoil(broken)
        with pytest.raises(Exception):
            validate_openapi(broken)
    # Served without a key; with one, the same.
    assert relay.call("GET", "/openapi.json", key=None)[1] == relay.call("GET", "/openapi.json")[1] == document


def test_the_document_and_the_route_table_are_one(relay, unharmed):
    from types import SimpleNamespace

    from relayd.control.api import Api
    from relayd.control.ztapi import SCHEMAS, ZtResources

    document = doc_of(relay)
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item}
    table = Api(lambda k: False, "x")
    table.add(ZtResources(SimpleNamespace(zs=None)).ops(), SCHEMAS)
    from relayd.control.devicegw import SCHEMAS as DEVICE_SCHEMAS, DeviceGateway

    table.add(DeviceGateway(None, None, None, None).ops(), DEVICE_SCHEMAS)
    from relayd.control.webhooks import SCHEMAS as HOOK_SCHEMAS, WebhookResources

    table.add(WebhookResources(None).ops(), HOOK_SCHEMAS)
    from relayd.control.provisioning import SCHEMAS as OTP_SCHEMAS, Otps, Provisioning

    table.add(Provisioning(Otps(None), None, lambda: "", "").ops(), OTP_SCHEMAS)
    from relayd.control.deviceproxy import SCHEMAS as PROXY_SCHEMAS, ProxyResources

    table.add(ProxyResources(None, None).ops(), PROXY_SCHEMAS)
    from relayd.control.devices import SCHEMAS as USER_SCHEMAS, DeviceResources

    table.add(DeviceResources(None, None, None).ops(), USER_SCHEMAS)
    from relayd.control.admin import SCHEMAS as ADMIN_SCHEMAS, AdminResources

    table.add(AdminResources(None, None, None, None).ops(), ADMIN_SCHEMAS)
    from relayd.control.console import Console

    table.add(Console(lambda k: False, lambda: None, ()).ops(), Console.SCHEMAS)
    assert documented == {(op.method, API + op.path) for op in table.ops}
    # Every documented route exists on the running relay: without a key it
    # answers 401 (the document's own route: 200), never 404 or 405; a
    # method it does not document gets 405 with Allow.
    for path, item in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", lambda m: {"{provider}": "local", "{device_id}": "0" * 32}.get(
            m.group(0), "x1"), path)
        for method, op in item.items():
            st, _, data = relay.raw(method.upper(), concrete, b"{}" if "requestBody" in op else None,
                                    {"Content-Type": "application/json"} if "requestBody" in op else {})
            want = 401 if op["security"] else 422 if "requestBody" in op else 200  # {} is no valid body
            assert st == want, f"{method} {concrete}: {st} {data[:200]!r}"
        # (a method of another template that matches too, such as DELETE
        # /devices/{id} for /devices/claim, is that route's: not missing)
        overlap = {m for p, other in document["paths"].items()
                   if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(p)), concrete) for m in other}
        missing = {"get", "post", "put", "patch", "delete"} - set(item) - overlap
        if missing:
            st, h, _ = relay.raw(sorted(missing)[0].upper(), concrete, None, {"Authorization": f"Bearer {relay.key}"})
            assert st == 405
            takes = set(item) | overlap
            assert set(h["allow"].split(", ")) == {m.upper() for m in takes} | ({"HEAD"} if "get" in takes else set())
    # Every error a route gives is documented with the error schema.
    for item in document["paths"].values():
        for op in item.values():
            assert "404" in op["responses"] and "400" in op["responses"]
            assert "401" in op["responses"] or not op["security"]  # (a password grant's 401 has none)


# -- CRUD that changes what a live user reaches ------------------------------------------------------


def test_crud_round_trips(relay, unharmed):
    document = doc_of(relay)

    def ok(method, path, template, want, doc=None, headers=None):
        st, body, h = relay.call(method, path, doc, headers=headers)
        assert st == want, (method, path, st, body)
        conforms(document, method, template, st, body)
        return body, h

    # users
    users, _ = ok("GET", "/admin/users", "/admin/users", 200)
    assert {u["username"] for u in users["items"]} >= {"alice", "carol"}
    dave, _ = ok("POST", "/admin/users", "/admin/users", 201,
                 {"username": "dave", "password": PASSWORD, "email": "dave@example.com", "totp": True})
    assert dave["totp"] and len(dave["totp_secret"]) >= 16 and dave["totp_uri"].startswith("otpauth://")
    assert relay.call("POST", "/admin/users", {"username": "dave", "password": PASSWORD})[0] == 409
    u = "/admin/users/{provider}/{username}"
    got, _ = ok("GET", "/admin/users/local/dave", u, 200)
    assert "totp_secret" not in got and got["created_at"].endswith("Z") and not got["disabled"]
    got, _ = ok("PATCH", "/admin/users/local/dave", u, 200, {"groups": ["ops", "staff"], "totp": "off"},
                headers={"Content-Type": "application/merge-patch+json"})
    assert got["groups"] == ["ops", "staff"] and not got["totp"]
    got, _ = ok("PATCH", "/admin/users/local/dave", u, 200, {"totp": "reset", "password": "another password"})
    assert got["totp"] and got["totp_secret"] != dave["totp_secret"]
    groups, _ = ok("GET", "/admin/groups", "/admin/groups", 200)
    assert {"provider": "local", "username": "dave"} in next(g for g in groups["items"] if g["name"] == "ops")["members"]
    m = "/admin/groups/{group}/members/{provider}/{username}"
    ok("PUT", "/admin/groups/night%20shift/members/local/dave", m, 204)
    got, _ = ok("GET", "/admin/groups/night%20shift", "/admin/groups/{group}", 200)
    assert got == {"name": "night shift", "members": [{"provider": "local", "username": "dave"}]}
    ok("DELETE", "/admin/groups/night%20shift/members/local/dave", m, 204)
    assert relay.call("GET", "/admin/groups/night%20shift")[0] == 404
    assert relay.call("PUT", "/admin/groups/ops/members/local/nobody")[0] == 404

    # policy objects: each write bumps the version
    pv0 = ok("GET", "/admin/entitlements", "/admin/entitlements", 200)[0]["pv"]
    cond = {"id": "c-office", "criteria": [{"claim": "system.client_src_ip", "op": "cidr", "value": "192.0.2.0/24"}],
            "remedies": [{"type": "message", "kind": "info", "message": "Only from the office"}]}
    w, h = ok("POST", "/admin/conditions", "/admin/conditions", 201, cond)
    assert w["pv"] == pv0 + 1 and h["location"] == "/api/v1/admin/conditions/c-office"
    ent = {"id": "e-tmp", "site": "s-lab", "conditions": ["c-office"],
           "actions": [{"action": "allow", "proto": "tcp", "hosts": ["10.9.0.0/16"], "ports": [22]}]}
    w, _ = ok("PUT", "/admin/entitlements/e-tmp", "/admin/entitlements/{id}", 200, ent)
    assert w["pv"] == pv0 + 2 and w["item"]["rev"] == 1 and w["item"]["actions"][0]["ports"] == ["22"]
    got, _ = ok("GET", "/admin/entitlements/e-tmp", "/admin/entitlements/{id}", 200)
    # What GET gives, PUT takes back (rev and n are read-only).
    w, _ = ok("PUT", "/admin/entitlements/e-tmp", "/admin/entitlements/{id}", 200, got)
    assert w["item"]["rev"] == 2 and w["pv"] == pv0 + 3
    st, err, _ = relay.call("DELETE", "/admin/conditions/c-office")
    assert st == 409 and "e-tmp" in err["message"]
    st, err, _ = relay.call("PUT", "/admin/entitlements/e-tmp", dict(ent, id="e-other"))
    assert st == 422 and "path" in err["message"]
    st, err, _ = relay.call("PUT", "/admin/entitlements/e-tmp", dict(ent, site="nowhere"))
    assert st == 422 and "unknown site" in err["message"]
    ok("GET", "/admin/policies", "/admin/policies", 200)
    ok("GET", "/admin/sites/s-lab", "/admin/sites/{id}", 200)

    # the whole document: JSON and TOML out, and back in
    exported, h = ok("GET", "/admin/policy", "/admin/policy", 200)
    assert int(h["relayd-policy-version"]) == pv0 + 3
    assert "e-tmp" in {e["id"] for e in exported["entitlements"]}
    st, rh, toml = relay.raw("GET", API + "/admin/policy", None, {"Authorization": f"Bearer {relay.key}",
                                                                 "Accept": "application/toml"})
    assert st == 200 and rh["content-type"] == "application/toml"
    assert tomllib.loads(toml.decode())["entitlements"] == [  # (the TOML form leaves out the actions' n)
        dict(e, actions=[{k: v for k, v in a.items() if k != "n"} for a in e["actions"]])
        for e in exported["entitlements"]]
    st, rh, data = relay.raw("PUT", API + "/admin/policy", toml, {"Authorization": f"Bearer {relay.key}",
                                                                 "Content-Type": "application/toml"})
    assert st == 200 and json.loads(data)["pv"] == pv0 + 4
    w, _ = ok("PUT", "/admin/policy", "/admin/policy", 200, exported)
    assert w["pv"] == pv0 + 5
    ok("DELETE", "/admin/entitlements/e-tmp", "/admin/entitlements/{id}", 200)
    w, _ = ok("DELETE", "/admin/conditions/c-office", "/admin/conditions/{id}", 200)
    assert w["pv"] == pv0 + 7
    assert relay.call("GET", "/admin/entitlements/e-tmp")[0] == 404

    # devices and sessions (carol, the bystander, is signed in)
    devices, _ = ok("GET", "/admin/devices", "/admin/devices", 200)
    assert any(d["username"] == "carol" for d in devices["items"])
    sessions, _ = ok("GET", "/admin/sessions", "/admin/sessions", 200)
    assert any(s["username"] == "carol" and s["methods"] == ["pwd"] for s in sessions["items"])
    assert relay.call("DELETE", "/admin/devices/" + "0" * 32)[0] == 404
    revs, _ = ok("GET", "/admin/revocations?since=0", "/admin/revocations", 200)
    ok("DELETE", "/admin/users/local/dave", u, 204)
    assert relay.call("GET", "/admin/users/local/dave")[0] == 404
    assert relay.call("DELETE", "/admin/users/local/dave")[0] == 404
    revs2, _ = ok("GET", "/admin/revocations", "/admin/revocations", 200)
    new = revs2["items"][len(revs["items"]):]
    assert [(e["op"], e["selector"], e["actor"], e["reason"]) for e in new] == [
        ("kill", {"user": ["local", "dave"]}, "api", "user removed")]
    # Each write is an audit line (actor api), without the body.
    until_sync(lambda: '"action":"delete_user"' in relay.log(), 5, "no audit line for the delete")
    lines = [json.loads(x) for x in relay.log().splitlines() if '"logger":"relayd.audit"' in x]
    writes = [x for x in lines if x.get("actor") == "api"]
    assert {"create_user", "patch_user", "put_entitlement", "import_policy", "delete_user"} <= {
        x["action"] for x in writes}
    assert not any("another password" in json.dumps(x) for x in writes)


def _login(relay, name, tmp, **kw):
    return zc.login(tmp / name, f"https://127.0.0.1:{relay.ports['https']}", username=name, password=PASSWORD,
                    ca_file=str(relay.data / "ca" / "ca.crt"), device_claims={"os": {"family": "linux"}}, **kw)


async def _echo(c: zc.Connector, relay, key: str):
    stream, reply = await c.open_flow(ADDRS[key], relay.port_of(key))
    if stream is None:
        return None, reply
    await stream.write(b"ping")
    assert await asyncio.wait_for(stream.read(4), 10) == b"ping"
    return stream, reply


async def _alice(relay, tmp_path) -> zc.Connector:
    await asyncio.to_thread(_login, relay, "alice", tmp_path)
    c = zc.Connector(tmp_path / "alice", device_claims={"os": {"family": "linux"}})
    await c.start()
    return c


def test_an_entitlement_added_over_the_api_reaches_a_live_client_at_renewal(relay, unharmed, tmp_path):
    async def main():
        c = await _alice(relay, tmp_path)
        try:
            stream, _ = await _echo(c, relay, "a")
            assert stream is not None
            none, reply = await _echo(c, relay, "b")
            assert none is None and reply["r"] == "denied"
            ent = {"id": "e-b", "site": "s-lab", "tags": ["lab"],
                   "actions": [{"action": "allow", "proto": "tcp", "hosts": [ADDRS["b"]], "ports": ["1024-65535"]}]}
            st, w, _ = await asyncio.to_thread(relay.call, "POST", "/admin/entitlements", ent)
            assert st == 201
            old = c.state["claims"]
            await asyncio.sleep(1.1)  # token times are whole seconds: a renew covers those of earlier seconds
            st, w, _ = await asyncio.to_thread(relay.call, "POST", "/admin/revocations", {
                "op": "renew", "selector": {"user": ["local", "alice"]}, "delay": "2s", "reason": "new entitlement"})
            assert st == 201 and w["entries"][0]["op"] == "renew"
            await until(lambda: c.state["claims"] != old, 10, "the client did not renew")
            stream_b, reply = await _echo(c, relay, "b")
            assert stream_b is not None, reply
            # The flow opened before lives on.
            await stream.write(b"pong")
            assert await asyncio.wait_for(stream.read(4), 10) == b"pong"
        finally:
            await c.close()
            await asyncio.to_thread(relay.call, "DELETE", "/admin/entitlements/e-b")

    run(main())


def test_kill_over_the_api_cuts_a_live_flow_and_disable_refuses_sign_in(relay, unharmed, tmp_path):
    async def main():
        c = await _alice(relay, tmp_path)
        try:
            stream, _ = await _echo(c, relay, "a")
            st, w, _ = await asyncio.to_thread(relay.call, "POST", "/admin/revocations", {
                "op": "kill", "selector": {"user": ["local", "alice"]}, "types": ["claims", "entitlements"],
                "reason": "laptop lost"})
            assert st == 201 and w["entries"][0]["actor"] == "api"
            assert await _cut_within(stream, 2.0) < 1.0
        finally:
            await c.close()
        st, w, _ = await asyncio.to_thread(relay.call, "PATCH", "/admin/users/local/alice", {"disabled": True})
        assert st == 200 and w["disabled"]
        with pytest.raises(zc.ZtClientError) as e:
            await asyncio.to_thread(_login, relay, "alice", tmp_path)
        assert e.value.reason == "disabled"
        st, w, _ = await asyncio.to_thread(relay.call, "PATCH", "/admin/users/local/alice", {"disabled": False})
        assert st == 200 and not w["disabled"]
        # The kills cover tokens issued up to 5 s after them (clock skew);
        # token times are whole seconds.
        await asyncio.sleep(6.2)
        await asyncio.to_thread(_login, relay, "alice", tmp_path)

    run(main())


def test_the_api_is_only_on_the_relays_own_names(relay, unharmed):
    h = {"Authorization": f"Bearer {relay.key}"}
    assert relay.raw("GET", API + "/admin/users", None, h, host="relay.example")[0] == 200
    assert relay.raw("GET", API + "/admin/users", None, h, host="localhost")[0] == 200
    # app.example is an HTTP endpoint's name: its /api/v1 is the service's.
    st, _, body = relay.raw("GET", API + "/admin/users?" + MARKER, None, {}, host="app.example")
    assert st == 200 and body == b"ok /api/v1/admin/users?" + MARKER.encode()
    # (the Authorization header of that request went to the service, as any other request's)


def test_an_http_endpoint_cannot_take_the_apis_path_on_the_relays_names(tmp_path):
    res = subprocess.run(RELAYD + ["serve", "--data", str(tmp_path / "r"), "--agents", "127.0.0.1:0", "--https",
                                   "127.0.0.1:0", "--http", "x=127.0.0.1/api/v1/admin"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "/api/v1 on 127.0.0.1 is the relay's own API" in res.stderr


# -- hostile requests ------------------------------------------------------------------------------

M = MARKER.encode()
DEEP = {"id": "c-deep", "criteria": [{"not": {"not": {"not": {}}}}]}
for _ in range(40):
    DEEP = {"id": "c-deep", "criteria": [{"logic": "all", "criteria": DEEP["criteria"]}]}

# (name, method, path, body, headers (KEY: the admin key), status, error code, metric route)
HOSTILE = [
    ("no key", "GET", "/admin/users", None, {}, 401, "unauthorized", "/admin/users"),
    ("wrong key", "GET", "/admin/users", None, {"Authorization": "Bearer " + MARKER}, 401, "unauthorized",
     "/admin/users"),
    ("basic auth", "GET", "/admin/users", None, {"Authorization": "Basic " + MARKER}, 401, "unauthorized",
     "/admin/users"),
    ("key in the query", "GET", "/admin/users?access_token=KEY", None, {}, 400, "credentials_in_query",
     "/admin/users"),
    ("key in the query and the header", "GET", "/admin/sessions?api_key=" + MARKER, None, {"Authorization": "KEY"},
     400, "credentials_in_query", "/admin/sessions"),
    ("unknown query parameter", "GET", "/admin/users?" + MARKER + "=1", None, {"Authorization": "KEY"}, 400,
     "bad_query", "/admin/users"),
    ("garbage bytes", "POST", "/admin/users", b"\xff\xfe\x00" + M, {"Authorization": "KEY"}, 400, "bad_json",
     "/admin/users"),
    ("not JSON", "POST", "/admin/users", b"username=" + M, {"Authorization": "KEY"}, 400, "bad_json",
     "/admin/users"),
    ("not an object", "POST", "/admin/users", b'["' + M + b'"]', {"Authorization": "KEY"}, 400, "bad_request",
     "/admin/users"),
    ("wrong type", "POST", "/admin/users", {"username": 7, "password": MARKER}, {"Authorization": "KEY"}, 422,
     "invalid", "/admin/users"),
    ("unknown field", "POST", "/admin/users", {"username": "eve", "password": MARKER, "admin": True},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/users"),
    ("bad name", "POST", "/admin/users", {"username": "Eve\n" + MARKER, "password": MARKER},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/users"),
    ("form media type", "POST", "/admin/users", b"username=eve", {"Authorization": "KEY",
                                                                  "Content-Type": "application/x-www-form-urlencoded"},
     415, "unsupported_media_type", "/admin/users"),
    ("body on a GET", "GET", "/admin/users", {"x": MARKER}, {"Authorization": "KEY"}, 400, "bad_request",
     "/admin/users"),
    ("huge body", "PUT", "/admin/policy", b'{"sites": ["' + M * 200_000 + b'"]}', {"Authorization": "KEY"}, 413,
     "too_large", "/admin/policy"),
    ("nested too deep", "POST", "/admin/conditions", DEEP, {"Authorization": "KEY"}, 422, "invalid",
     "/admin/conditions"),
    ("bad policy object", "POST", "/admin/entitlements", {"id": "e-x", "site": "s-lab", "actions": [
        {"action": "allow", "proto": "tcp", "hosts": [MARKER + ";rm -rf /"], "ports": [22]}]},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/entitlements"),
    ("wrong selector type", "POST", "/admin/revocations", {"op": "kill", "selector": {"sid": 5}},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/revocations"),
    ("DN substring selector", "POST", "/admin/revocations", {"op": "kill", "selector": {"dn": "CN=" + MARKER}},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/revocations"),
    ("empty selector", "POST", "/admin/revocations", {"op": "kill", "selector": {}}, {"Authorization": "KEY"}, 422,
     "invalid", "/admin/revocations"),
    ("delay with kill", "POST", "/admin/revocations", {"op": "kill", "selector": {"all": True}, "delay": "1h"},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/revocations"),
    ("renew for a year", "POST", "/admin/revocations", {"op": "renew", "selector": {"all": True}, "delay": "365d"},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/revocations"),
    ("lock in the past", "POST", "/admin/revocations", {"op": "lock", "selector": {"user": ["local", "x"]},
                                                          "until": "2001-01-01T00:00:00Z"},
     {"Authorization": "KEY"}, 422, "invalid", "/admin/revocations"),
    ("bad since", "GET", "/admin/revocations?since=-1", None, {"Authorization": "KEY"}, 422, "invalid",
     "/admin/revocations"),
    ("control characters in an id", "GET", "/admin/users/local/%00%0a" + MARKER, None, {"Authorization": "KEY"},
     404, "not_found", "/admin/users/{provider}/{username}"),
    ("an id of 1000 characters", "DELETE", "/admin/entitlements/" + "a" * 1000, None, {"Authorization": "KEY"},
     404, "not_found", "/admin/entitlements/{id}"),
    ("invalid UTF-8 in an id", "GET", "/admin/users/local/%ff%fe", None, {"Authorization": "KEY"}, 404,
     "not_found", "-"),
    ("a dot segment out of a resource", "DELETE", "/admin/devices/../" + MARKER, None, {"Authorization": "KEY"},
     404, "not_found", "-"),
    ("a dot segment to another resource, without a key", "GET", "/admin/users/local/%2e%2e/%2e%2e/sessions",
     None, {}, 401, "unauthorized", "/admin/sessions"),
    ("no such route", "GET", "/admin/" + MARKER, None, {"Authorization": "KEY"}, 404, "not_found", "-"),
    ("wrong method", "PATCH", "/admin/policy", {"x": 1}, {"Authorization": "KEY"}, 405, "method_not_allowed",
     "/admin/policy"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_requests_are_refused_counted_and_not_logged(relay, unharmed, case):
    _, method, path, body, headers, status, code, route = case
    headers = {k: v.replace("KEY", f"Bearer {relay.key}") if v == "KEY" else v for k, v in headers.items()}
    path = path.replace("=KEY", "=" + relay.key)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif body is not None:
        headers.setdefault("Content-Type", "application/json")
    label = method if method in ("GET", "POST", "PUT", "PATCH", "DELETE") else "other"
    before = relay.metric("relayd_api_requests_total", route=route, method=label, status=str(status))
    st, h, data = relay.raw(method, API + path, body, headers)
    assert st == status, data[:300]
    err = json.loads(data)
    assert err["error"] == code and set(err) == {"error", "message"}
    assert relay.key not in err["message"]
    if status == 401:
        assert MARKER not in err["message"]
        assert h["www-authenticate"].startswith('Bearer realm="relayd"')
    if status == 405:
        assert "allow" in h
    until_sync(lambda: relay.metric("relayd_api_requests_total", route=route, method=label,
                                    status=str(status)) == before + 1, 5, "the refusal was not counted")
    log = relay.log()
    assert MARKER not in log and relay.key not in log


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/admin/users/local/..%2F..%2F" + MARKER, 400),  # an encoded slash
    ("GET", "/admin/../../../../" + MARKER, 400),  # above the root
    ("PAYLOAD", "/admin/users", 501),  # a method nobody knows
])
def test_the_front_door_refuses_some_requests_before_the_api(relay, unharmed, method, path, status):
    before = relay.metric("relayd_http_error_responses_total", status=str(status))
    st, _, _ = relay.raw(method, API + path, None, {"Authorization": f"Bearer {relay.key}"})
    assert st == status
    until_sync(lambda: relay.metric("relayd_http_error_responses_total", status=str(status)) == before + 1, 5,
               "not counted")
    assert MARKER not in relay.log()


def test_a_body_over_the_limit_on_a_kept_alive_connection(relay, unharmed):
    # The connection survives the refusal and serves the next request.
    c = http.client.HTTPSConnection("127.0.0.1", relay.ports["https"], context=relay.ctx, timeout=15)
    try:
        h = {"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"}
        c.request("POST", API + "/admin/users", body=b"[" + b"1," * (2 << 20) + b"1]", headers=h)
        r = c.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"] == "too_large"
        c.request("GET", API + "/admin/users", headers=h)
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["items"]
    finally:
        c.close()


# -- the key --------------------------------------------------------------------------------------


def test_the_first_key_is_in_a_private_file_and_only_its_place_is_logged(relay, unharmed):
    path = relay.data / "admin-api.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert relay.key.startswith("rak_") and len(relay.key) >= 40
    line = next(json.loads(x) for x in relay.log().splitlines() if "admin API key created" in x)
    assert line["file"] == str(path)


def test_rotation_in_another_process_takes_effect_at_once(relay, unharmed):
    old = relay.key
    assert relay.call("GET", "/admin/users")[0] == 200
    res = cli("admin", "api-key", "rotate", "--data", str(relay.data))
    new = res.stdout.strip()
    assert re.fullmatch(r"rak_[A-Za-z0-9_-]{43}", new) and new != old
    relay.keys_seen.add(new)
    assert not (relay.data / "admin-api.key").exists()  # it held the old key
    st, err, h = relay.call("GET", "/admin/users", key=old)
    assert st == 401 and err["error"] == "unauthorized" and 'error="invalid_token"' in h["www-authenticate"]
    relay.key = new
    assert relay.call("GET", "/admin/users")[0] == 200
    assert listening(relay.ports["https"])


def test_the_command_line_and_the_api_change_the_same_things(relay, unharmed):
    d = str(relay.data)
    res = subprocess.run(RELAYD + ["admin", "user", "add", "erin", "--group", "ops", "--password-stdin", "--data", d],
                         input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    st, u, _ = relay.call("GET", "/admin/users/local/erin")
    assert st == 200 and u["groups"] == ["ops"] and not u["disabled"]
    assert relay.call("PATCH", "/admin/users/local/erin", {"disabled": True})[0] == 200
    assert re.search(r"erin +no +disabled +ops", cli("admin", "user", "list", "--data", d).stdout)
    cli("admin", "user", "enable", "erin", "--data", d)
    assert not relay.call("GET", "/admin/users/local/erin")[1]["disabled"]
    cli("admin", "user", "disable", "erin", "--data", d)
    assert relay.call("GET", "/admin/users/local/erin")[1]["disabled"]
    st, e, _ = relay.call("POST", "/admin/entitlements", {"id": "e-cli", "site": "s-lab", "actions": [
        {"action": "allow", "proto": "tcp", "hosts": ["10.1.2.3"], "ports": [443]}]})
    assert st == 201
    assert "e-cli" in cli("admin", "entitlement", "list", "--data", d).stdout
    cli("admin", "entitlement", "rm", "e-cli", "--data", d)
    assert relay.call("GET", "/admin/entitlements/e-cli")[0] == 404
    cli("admin", "user", "rm", "erin", "--data", d)
    assert relay.call("GET", "/admin/users/local/erin")[0] == 404
    st, revs, _ = relay.call("GET", "/admin/revocations")
    assert {("user disabled", "cli"), ("user disabled", "api"), ("user removed", "cli")} <= {
        (e["reason"], e["actor"]) for e in revs["items"] if e["selector"] == {"user": ["local", "erin"]}}
