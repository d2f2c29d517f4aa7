"""The relay's own resources in the admin API (relayd.control.admin,
docs/api.md) through a real relay in this process, its HTTPS port and real
agents: each route's answers and refusals with their status, every answer
checked against the OpenAPI document the relay serves, and what a console
needs live (agents online with what they offer, endpoints' traffic, hybrid
connections' listeners and sender connections)."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
import time

import pytest
from openapi_spec_validator import validate as validate_openapi

from relayd.client import hybrid
from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from relayd.net.mux import MuxConnection
from tests.tunnel.util import echo_service, start_agent, start_relay
from tests.waiting import until_sync
from tests.zerotrust.test_admin_api import conforms

pytestmark = pytest.mark.once

API = "/api/v1"
CFG_RULE = sas.SasRule("cfg-root", "Y2ZnLXJvb3Qta2V5LW9mLXRoZS1ub2Rl", rights=frozenset({"listen", "send"}))
CFG_HC_RULE = sas.SasRule("cfg-listen", "Y2ZnLWxpc3Rlbi1rZXktMTIzNDU2Nzg=", rights=frozenset({"listen"}))
CATALOG = Catalog.of([HybridConnection("cfg/hc", rules=(CFG_HC_RULE,))], [CFG_RULE])


class Live:
    """A relay (TCP endpoint echo, HTTPS, hybrid connections of its config)
    and an agent serving echo, on an event loop in a thread of their own."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the relay did not start"
        if self.error is not None:
            raise self.error
        self.key = (self.relay.data / "admin-api.key").read_text().strip()
        self.ctx = ssl.create_default_context(cafile=str(self.relay.ca_path))
        self.document = self.call("GET", "/openapi.json")[1]

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            try:
                async with echo_service() as port:
                    self.echo = port
                    self.relay = await start_relay(self.tmp, https=("127.0.0.1", 0), hybrid=CATALOG)
                    self.ready.set()
                    await self.stop.wait()
                    await self.relay.stop()
            except BaseException as exc:
                self.error = exc
                self.ready.set()

        run(main())

    def submit(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        c = http.client.HTTPSConnection("127.0.0.1", self.relay.https_port, context=self.ctx, timeout=15)
        try:
            c.request(method, API + path, body, headers or {})
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    def call(self, method: str, path: str, doc=None, key: str | None = ""):
        h = {"Authorization": f"Bearer {self.key if key == '' else key}"} if key is not None else {}
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            h["Content-Type"] = "application/json"
        status, rh, data = self.raw(method, path, body, h)
        return status, (json.loads(data) if data else None), rh

    def ok(self, method: str, path: str, template: str, want: int, doc=None):
        """A call whose status is ``want`` and whose answer is the one the
        document gives for it."""
        status, body, _ = self.call(method, path, doc)
        assert status == want, (method, path, status, body)
        conforms(self.document, method, template, status, body)
        return body

    def refused(self, method: str, path: str, template: str, want: int, doc=None, raw: bytes | None = None,
                ctype: str = "application/json") -> str:
        if raw is not None:
            status, _, data = self.raw(method, path, raw, {"Authorization": f"Bearer {self.key}",
                                                           "Content-Type": ctype})
            body = json.loads(data)
        else:
            status, body, _ = self.call(method, path, doc)
        assert status == want, (method, path, status, body)
        conforms(self.document, method, template, status, body)
        return body["message"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    lv = Live(tmp_path_factory.mktemp("adminres"))
    yield lv
    lv.close()


def _agent(live, name: str, token: str, **kw):
    return live.submit(start_agent(live.tmp, name, token, {"echo": ("127.0.0.1", live.echo)}, **kw))


def test_the_document_is_valid_and_describes_every_new_route(live):
    validate_openapi(live.document)
    ops = {(m.upper(), p) for p, item in live.document["paths"].items() for m in item}
    from relayd.control.admin import AdminResources

    for op in AdminResources(None, None, None, None).ops():
        assert (op.method, API + op.path) in ops
        doc = live.document["paths"][API + op.path][op.method.lower()]
        # The admin key, or the web console's session with its CSRF token (docs/console.md), but for
        # the key's rotation, which takes the key itself.
        keys = [{"adminKey": []}] + ([{"consoleSession": [], "consoleCsrf": []}] if op.session else [])
        assert doc["security"] == keys and {"400", "401", "404"} <= set(doc["responses"])
        assert ("requestBody" in doc) == (op.body is not None)


def test_status_ca_and_the_key(live):
    s = live.ok("GET", "/admin/status", "/admin/status", 200)
    assert s["live"] and s["ca_pin"] == live.relay.ca.pin and s["https_address"] == f"127.0.0.1:{live.relay.https_port}"
    assert s["agents_address"] == f"127.0.0.1:{live.relay.agents_port}" and s["started_at"].endswith("Z")
    ca = live.ok("GET", "/admin/ca", "/admin/ca", 200)
    assert ca["certificate"] == live.relay.ca.cert_pem.decode() and ca["pin"] == live.relay.ca.pin
    old = live.key
    new = live.ok("POST", "/admin/api-key/rotate", "/admin/api-key/rotate", 200)["key"]
    assert new.startswith("rak_") and new != old and not (live.relay.data / "admin-api.key").exists()
    assert live.call("GET", "/admin/status", key=old)[0] == 401
    live.key = new
    assert live.call("GET", "/admin/status")[0] == 200
    assert live.call("GET", "/admin/status", key=None)[0] == 401


def test_join_tokens_enroll_list_and_revoke_agents(live):
    t = "/admin/join-tokens"
    made = live.ok("POST", t, t, 201, {"endpoints": ["echo"], "ttl": "5m"})
    assert made["token"].startswith("relayd1.") and made["state"] == "pending" and made["endpoints"] == ["echo"]
    assert made["address"] == f"127.0.0.1:{live.relay.agents_port}"
    wss = live.ok("POST", t, t, 201, {"transport": "wss"})  # no body fields needed either
    assert wss["address"] == f"127.0.0.1:{live.relay.https_port}" and wss["endpoints"] == []
    bare = live.call("POST", t)[1]  # no body at all: the defaults (any endpoint, 15 minutes)
    assert bare["state"] == "pending"
    assert live.call("DELETE", f"{t}/{bare['id']}")[0] == 204
    got = live.ok("GET", f"{t}/{bare['id']}", t + "/{token_id}", 200)
    assert got["state"] == "revoked" and got["revoked_at"] and "token" not in got
    # The revoked token enrolls nobody.
    with pytest.raises(Exception, match="revoked"):
        live.submit(start_agent(live.tmp, "nobody", bare["token"], {"echo": ("127.0.0.1", 9)}))

    agent = _agent(live, "a1", made["token"])
    try:
        listing = live.ok("GET", "/admin/agents", "/admin/agents", 200)
        a = next(x for x in listing["items"] if x["status"] == "online")
        assert a["offered"] == ["echo"] and a["serving"] == ["echo"] and a["endpoints"] == ["echo"]
        assert a["streams"] == 0 and a["address"].startswith("127.0.0.1:") and a["device"] is None
        one = live.ok("GET", f"/admin/agents/{a['id']}", "/admin/agents/{agent_id}", 200)
        assert one["id"] == a["id"]
        tokens = live.ok("GET", t, t, 200)["items"]
        used = next(x for x in tokens if x["id"] == made["id"])
        assert used["state"] == "used" and used["agent_id"] == a["id"]
        assert not any("token" in x for x in tokens)
        assert "revoke the agent" in live.refused("DELETE", f"{t}/{made['id']}", t + "/{token_id}", 409)
        # Revocation cuts the live link within a second.
        conn: MuxConnection = live.relay.sessions[a["id"]].conn
        t0 = time.monotonic()
        gone = live.ok("POST", f"/admin/agents/{a['id']}/revoke", "/admin/agents/{agent_id}/revoke", 200)
        assert gone["status"] == "revoked" and gone["revoked_at"]
        until_sync(lambda: conn.closed, 3, "the revoked agent's link is still up")
        assert time.monotonic() - t0 < 1.5
        again = live.ok("POST", f"/admin/agents/{a['id']}/revoke", "/admin/agents/{agent_id}/revoke", 200)
        assert again["revoked_at"] == gone["revoked_at"]
        until_sync(lambda: live.call("GET", f"/admin/agents/{a['id']}")[1]["streams"] is None, 5, "still live")
    finally:
        live.submit(agent.stop())
    # Refusals.
    for path, template in (("/admin/agents/ag-000000000000", "/admin/agents/{agent_id}"),
                           ("/admin/agents/ag-000000000000/revoke", "/admin/agents/{agent_id}/revoke"),
                           (f"{t}/AAAAAAAAAAAA", t + "/{token_id}")):
        live.refused("POST" if path.endswith("revoke") else "GET", path, template, 404)
    live.refused("GET", "/admin/agents/%20bad", "/admin/agents/{agent_id}", 404)
    live.refused("DELETE", f"{t}/AAAAAAAAAAAA", t + "/{token_id}", 404)
    assert "ttl" in live.refused("POST", t, t, 422, {"ttl": "0s"})
    assert "ttl" in live.refused("POST", t, t, 422, {"ttl": "400d"})
    assert "ttl" in live.refused("POST", t, t, 422, {"ttl": "soon"})
    assert "endpoints" in live.refused("POST", t, t, 422, {"endpoints": ["no spaces"]})
    assert "unknown field" in live.refused("POST", t, t, 422, {"endpoint": ["echo"]})
    live.refused("POST", t, t, 400, raw=b"{not json")
    live.refused("POST", t, t, 415, raw=b"ttl=5m", ctype="application/x-www-form-urlencoded")


def test_endpoints_with_their_agents_and_traffic(live):
    token = live.call("POST", "/admin/join-tokens", {"endpoints": ["echo"]})[1]["token"]
    agent = _agent(live, "a2", token)
    try:
        before = live.ok("GET", "/admin/endpoints/echo", "/admin/endpoints/{name}", 200)
        port = live.relay.tcp_ports["echo"]
        assert before["kind"] == "tcp" and before["listen"] == f"127.0.0.1:{port}" and before["route"] is None
        assert len(before["agents"]) == 1
        s = socket.create_connection(("127.0.0.1", port), 5)
        try:
            s.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(s.recv(65536))
            during = live.ok("GET", "/admin/endpoints", "/admin/endpoints", 200)["items"][0]
            assert during["connections"] == 1 and during["streams_active"] == 1
            assert during["bytes_in"] - before["bytes_in"] >= 100_000
            assert during["bytes_out"] - before["bytes_out"] >= 100_000
            assert during["streams_opened"] == before["streams_opened"] + 1
            a = next(x for x in live.call("GET", "/admin/agents")[1]["items"] if x["status"] == "online")
            assert a["streams"] == 1 and a["bytes_in"] >= 100_000
        finally:
            s.close()
        live.refused("GET", "/admin/endpoints/nope", "/admin/endpoints/{name}", 404)
    finally:
        live.submit(agent.stop())


def test_hybrid_connections_rules_keys_and_listeners(live):
    h, r = "/admin/hybrid-connections", "/admin/hybrid-rules"
    made = live.ok("POST", h, h, 201, {"path": "orders/eu", "response_timeout": "90s", "control_threshold": 4096})
    assert made["id"] == "orders~eu" and made["source"] == "data" and made["response_timeout"] == 90
    assert "already exists" in live.refused("POST", h, h, 409, {"path": "ORDERS/eu"})
    assert "configuration" in live.refused("POST", h, h, 409, {"path": "cfg/hc"})
    assert "hybrid connection path" in live.refused("POST", h, h, 422, {"path": "bad//path"})
    live.refused("POST", h, h, 422, {"path": "x", "control_threshold": 10})
    items = {x["path"]: x for x in live.ok("GET", h, h, 200)["items"]}
    assert items["cfg/hc"]["source"] == "config" and items["cfg/hc"]["rules"] == [
        {"name": "cfg-listen", "rights": ["listen"], "source": "config"}]
    one = h + "/{hc}"
    rules = h + "/{hc}/rules"
    # Rules of the hybrid connection and of the node; keys only in POST answers.
    rule = live.ok("POST", f"{h}/orders~eu/rules", rules, 201, {"name": "eu-listen", "rights": ["listen"]})
    host = f"127.0.0.1:{live.relay.https_port}"
    assert rule["scope"] == "orders/eu" and rule["secondary_key"] is None and rule["primary_connection_string"] == (
        f"Endpoint=sb://{host}/;SharedAccessKeyName=eu-listen;SharedAccessKey={rule['primary_key']};"
        "EntityPath=orders/eu")
    assert "exists already" in live.refused("POST", f"{h}/orders~eu/rules", rules, 409,
                                            {"name": "eu-listen", "rights": ["send"]})
    assert "configuration" in live.refused("POST", f"{h}/cfg~hc/rules", rules, 409, {"name": "x", "rights": ["send"]})
    node = live.ok("POST", r, r, 201, {"name": "senders", "rights": ["send"], "key": "a-key-the-admin-chose-1"})
    assert node["primary_key"] == "a-key-the-admin-chose-1" and node["scope"] is None
    assert "configuration" in live.refused("POST", r, r, 409, {"name": "cfg-root", "rights": ["send"]})
    assert "rights" in live.refused("POST", r, r, 422, {"name": "x", "rights": ["root"]})
    assert "SAS rule name" in live.refused("POST", r, r, 422, {"name": "bad name", "rights": ["send"]})
    assert "16 to 256" in live.refused("POST", r, r, 422, {"name": "x", "rights": ["send"], "key": "short"})
    assert {x["name"]: x["source"] for x in live.ok("GET", r, r, 200)["items"]} == {"cfg-root": "config",
                                                                                    "senders": "data"}
    got = live.ok("GET", f"{h}/orders~eu", one, 200)
    assert got["rules"] == [{"name": "eu-listen", "rights": ["listen"], "source": "data"}] and got["listeners"] == []
    assert "primary_key" not in json.dumps(live.call("GET", h)[1])
    keys = live.ok("POST", f"{r}/senders/list-keys", r + "/{rule}/list-keys", 200, {"host": "relay.example:8443"})
    assert keys["primary_connection_string"].startswith("Endpoint=sb://relay.example:8443/;")

    async def listen_and_send():
        cs = hybrid.parse_connection_string(rule["primary_connection_string"])
        accepted = asyncio.Event()

        async def echo(ws):
            accepted.set()
            async for m in ws:
                await ws.send(m)

        lst = hybrid.Listener(cs, on_accept=echo, ssl=live.ctx, listener_id="console-1")
        task = asyncio.ensure_future(lst.run())
        await asyncio.wait_for(lst.online.wait(), 10)
        sender_cs = hybrid.parse_connection_string(node["primary_connection_string"] + ";EntityPath=orders/eu")
        ws = await hybrid.connect(sender_cs, ssl=live.ctx)
        await ws.send(b"y" * 50_000)
        assert await asyncio.wait_for(ws.recv(), 10) == b"y" * 50_000
        return lst, task, ws

    lst, task, ws = live.submit(listen_and_send())
    try:
        got = live.ok("GET", f"{h}/orders~eu", one, 200)
        assert [x["id"] for x in got["listeners"]] == ["console-1"] and got["active_connections"] == 1
        assert got["bytes_to_listener"] >= 0  # (counted as a connection ends)
        assert live.ok("GET", "/admin/status", "/admin/status", 200)["hybrid_listeners"] == 1
        # A rotation keeps the old key good as the secondary: the listener stays.
        rot = live.ok("POST", f"{h}/orders~eu/rules/eu-listen/rotate", rules + "/{rule}/rotate", 200)
        assert rot["secondary_key"] == rule["primary_key"] and rot["primary_key"] != rule["primary_key"]
        rot2 = live.ok("POST", f"{r}/senders/rotate", r + "/{rule}/rotate", 200, {"key": "another-admin-key-22"})
        assert rot2["primary_key"] == "another-admin-key-22"
        assert "configuration" in live.refused("POST", f"{r}/cfg-root/rotate", r + "/{rule}/rotate", 409)
        assert "configuration" in live.refused("DELETE", f"{r}/cfg-root", r + "/{rule}", 409)
        assert "configuration" in live.refused("DELETE", f"{h}/cfg~hc", one, 409)
        # Deleting it closes its listener within a second.
        live.submit(ws.close())
        assert live.call("DELETE", f"{h}/orders~eu")[0] == 204
        until_sync(lambda: not live.relay.hybrid.listeners.get("orders/eu"), 3, "the listener is still there")
        assert all(x["path"] != "orders/eu" for x in live.call("GET", h)[1]["items"])
    finally:
        live.submit(lst.close())
        task.cancel()
    assert live.call("DELETE", f"{r}/senders")[0] == 204
    for method, path, template in (("GET", f"{h}/orders~eu", one), ("DELETE", f"{h}/orders~eu", one),
                                   ("DELETE", f"{r}/senders", r + "/{rule}"),
                                   ("POST", f"{r}/nobody/list-keys", r + "/{rule}/list-keys"),
                                   ("POST", f"{h}/nowhere/rules", rules),
                                   ("GET", f"{h}/a~~b", one)):
        live.refused(method, path, template, 404, {"name": "x", "rights": ["send"]} if path.endswith("rules")
                     else None)
