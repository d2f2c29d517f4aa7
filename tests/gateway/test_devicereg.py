"""The device registry, its connection events and claim codes, and the
user API (issue 13 items 3-4; docs/device-cloud.md), on an in-process relay with
real agents over loopback: the events on the in-process bus, the claim
flow end to end with a user of relayd's own directory (the agent's
claim_code file, the claim, the file gone), sharing and roles, and hostile
calls beside a bystander stream that must stay intact."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time

import orjson

from relayd.agent import AgentNode
from relayd.config import AgentConfig
from relayd.control import devices, jws
from relayd.control.devicegw import load_or_create_key
from relayd.control.events import DEVICE_CONNECTED, DEVICE_DISCONNECTED
from relayd.net import run
from tests.gateway.devices import https, relay_with_https
from tests.metric import value
from tests.tunnel.util import FAST_MUX, echo_ok, echo_service, join_token
from tests.waiting import until


async def enrolled_device(tmp_path, relay, name: str, endpoints: dict, start: bool = True, **kw) -> AgentNode:
    """An agent enrolled with a join token, made a device with
    Store.register_device before its tunnel first comes up."""
    cfg = AgentConfig(data=tmp_path / name, join=join_token(relay), endpoints=endpoints, mux=FAST_MUX,
                      reconnect_max=1.0, **kw)
    agent = AgentNode(cfg)
    ident = await agent.enroll(cfg.join)
    relay.store.register_device(ident["agent_id"], name, {"site": "lab"})
    if start:
        await agent.start()
        await asyncio.wait_for(agent.connected.wait(), 10)
    return agent


async def call(relay, method, path, token=None, body=None, raw: bytes | None = None, bearer=True, ctype=None):
    headers = {}
    if token is not None:
        headers["Authorization"] = ("Bearer " if bearer else "") + token
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
    if data:
        headers["Content-Type"] = ctype or "application/json"
    status, _, out = await https(relay, method, "/api/v1" + path, data, headers)
    return status, (orjson.loads(out) if out.strip() else None)


async def local_token(relay, username: str, password: str) -> str:
    status, doc = await call(relay, "POST", "/users/token", body={"username": username, "password": password})
    assert status == 200, doc
    assert doc["token_type"] == "Bearer" and doc["expires_in"] == 3600
    return doc["token"]


def test_claim_flow_events_sharing_and_hostile_calls(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        relay = await relay_with_https(tmp_path)
        events = []
        relay.bus.subscribe(events.append)
        ctl = relay.zt.ctl
        for name in ("alice", "bob", "carol", "mallory"):
            ctl.add_user(name, f"pw-{name}-0123456789", email=f"{name}@example.com")
        try:
            async with echo_service() as port:
                bystander = await enrolled_device(tmp_path, relay, "bystander", {"echo": ("127.0.0.1", port)})
                agent = await enrolled_device(tmp_path, relay, "cam", {"echo": ("127.0.0.1", port)})
                did = agent.identity["agent_id"]
                # the claim code reaches the agent's file, 0600, and is acknowledged
                code_file = agent.claim_code_file
                await until(code_file.exists, 10, "claim code file")
                assert stat.S_IMODE(os.stat(code_file).st_mode) == 0o600
                code = code_file.read_text().strip()
                assert len(code) == 19 and code.count("-") == 3
                assert code == devices.claim_code(devices.load_or_create_secret(relay.data, devices.CLAIM_KEY_FILE),
                                                  did)
                await until(lambda: value("relayd_claim_codes_total", event="acked") >= 2, 10, "ack")
                # the connected events, spec 7.3 fields
                conn = await until(lambda: [e for e in events if e.type == DEVICE_CONNECTED and e.subject == did])
                assert set(conn[0].data) == {"device_id", "node", "remote_addr", "at"}
                assert conn[0].data["node"] == relay.node_name and conn[0].data["remote_addr"].startswith("127.0.0.1")
                # a reconnect sends the same code again
                code_file.unlink()
                agent.conn.abort()
                await until(code_file.exists, 15, "claim code sent again")
                assert code_file.read_text().strip() == code
                disc = [e for e in events if e.type == DEVICE_DISCONNECTED and e.subject == did]
                assert disc and set(disc[0].data) == {"device_id", "node", "at", "reason"}

                alice = await local_token(relay, "alice", "pw-alice-0123456789")
                bob = await local_token(relay, "bob", "pw-bob-0123456789")
                carol = await local_token(relay, "carol", "pw-carol-0123456789")
                mallory = await local_token(relay, "mallory", "pw-mallory-0123456789")
                status, me = await call(relay, "GET", "/users/me", alice)
                assert status == 200 and me["sub"] == "alice" and me["email"] == "alice@example.com"
                assert me["id"].startswith("usr_") and me["iss"] == relay.user_auth.issuer
                # Bearer prefix optional; the profile is made once
                status, again = await call(relay, "GET", "/users/me", alice, bearer=False)
                assert status == 200 and again["id"] == me["id"]
                ids = {}
                for n, t in (("bob", bob), ("carol", carol), ("mallory", mallory)):
                    ids[n] = (await call(relay, "GET", "/users/me", t))[1]["id"]
                assert (await call(relay, "GET", "/devices", alice)) == (200, {"items": []})

                # hostile inputs, each refused with its status and metric; the bystander stays intact
                bad_before = value("relayd_user_auth_refusals_total", reason="signature")
                forged = jws.sign({"iss": relay.user_auth.issuer, "aud": "relayd-device-api", "sub": "alice",
                                   "iat": int(time.time()), "nbf": int(time.time()), "exp": int(time.time()) + 60},
                                  devices.USER_TOKEN, load_or_create_key(tmp_path, "other.key"))
                forged = forged.split(".")
                kid_header = alice.split(".")[0]
                forged = ".".join([kid_header, forged[1], forged[2]])
                key = load_or_create_key(relay.data, devices.USER_KEY_FILE)
                expired = jws.sign({"iss": relay.user_auth.issuer, "aud": "relayd-device-api", "sub": "alice",
                                    "iat": 1000, "nbf": 1000, "exp": 2000}, devices.USER_TOKEN, key)
                other_aud = jws.sign({"iss": relay.user_auth.issuer, "aud": "someone-else", "sub": "alice",
                                      "iat": int(time.time()), "nbf": int(time.time()),
                                      "exp": int(time.time()) + 60}, devices.USER_TOKEN, key)
                for token, reason in ((None, "missing"), ("garbage", "malformed"), ("a.b.c", "issuer"),
                                      (forged, "signature"), (expired, "expired"), (other_aud, "audience")):
                    before = value("relayd_user_auth_refusals_total", reason=reason)
                    status, doc = await call(relay, "GET", "/devices", token)
                    assert status == 401 and doc["error"] == "unauthorized", (reason, doc)
                    assert value("relayd_user_auth_refusals_total", reason=reason) == before + 1, reason
                assert value("relayd_user_auth_refusals_total", reason="signature") == bad_before + 1
                assert await echo_ok(relay.tcp_ports["echo"])
                # wrong password: refused and counted
                status, doc = await call(relay, "POST", "/users/token", body={"username": "alice", "password": "x"})
                assert status == 401 and doc["error"] == "bad_credentials"
                # malformed bodies
                for raw, ctype, want in ((b"{", None, 400), (b"[]", None, 400), (b'{"code": 1}', None, 422),
                                         (b'{"claim_code": 5}', None, 422), (b"x", "text/plain", 415),
                                         (b'{"claim_code": "' + b"A" * 100 + b'"}', None, 422)):
                    status, _ = await call(relay, "POST", "/devices/claim", mallory, raw=raw, ctype=ctype)
                    assert status == want, (raw, status)
                # wrong codes, then brute force: 429 after 10 failures a minute, even with the right code
                status, doc = await call(relay, "POST", "/devices/claim", mallory, {"claim_code": "not a code!"})
                assert status == 404 and doc["error"] == "unknown_code"
                wrong = "0000-0000-0000-0000" if code != "0000-0000-0000-0000" else "1111-1111-1111-1111"
                for _ in range(9):
                    status, doc = await call(relay, "POST", "/devices/claim", mallory, {"claim_code": wrong})
                    assert status == 404
                before = value("relayd_device_claims_total", result="rate_limited")
                status, doc = await call(relay, "POST", "/devices/claim", mallory, {"claim_code": code})
                assert status == 429 and doc["error"] == "too_many_attempts"
                assert value("relayd_device_claims_total", result="rate_limited") == before + 1
                assert await echo_ok(relay.tcp_ports["echo"])
                # someone else's unclaimed device is not visible
                assert (await call(relay, "GET", f"/devices/{did}", alice))[0] == 404

                # the claim: any spelling of the code; the agent's file goes
                status, doc = await call(relay, "POST", "/devices/claim", alice,
                                         {"claim_code": code.lower().replace("-", " ")})
                assert (status, doc) == (200, {"device_id": did, "role": "owner"})
                await until(lambda: not code_file.exists(), 10, "claim code file removed")
                status, doc = await call(relay, "POST", "/devices/claim", bob, {"claim_code": code})
                assert status == 404 and doc["error"] == "unknown_code"  # erased on success
                status, lst = await call(relay, "GET", "/devices", alice)
                assert status == 200 and [(d["id"], d["state"], d["claimed"], d["role"]) for d in lst["items"]] == [
                    (did, "online", True, "owner")]
                status, d = await call(relay, "GET", f"/devices/{did}", alice)
                assert d["labels"] == {"site": "lab"} and d["owner"] == me["id"] and d["node"] == relay.node_name
                assert d["certificate"]["serial"]

                # sharing and roles
                assert (await call(relay, "GET", f"/devices/{did}", bob))[0] == 404
                assert (await call(relay, "PUT", f"/devices/{did}/users/{ids['bob']}", bob, {"role": "admin"}))[0] == 404
                status, share = await call(relay, "PUT", f"/devices/{did}/users/{ids['bob']}", alice, {"role": "viewer"})
                assert status == 200 and share["role"] == "viewer" and share["user_id"] == ids["bob"]
                assert (await call(relay, "GET", f"/devices/{did}", bob))[1]["role"] == "viewer"
                assert (await call(relay, "PATCH", f"/devices/{did}", bob, {"name": "x"}))[0] == 403
                assert (await call(relay, "PUT", f"/devices/{did}/users/{ids['carol']}", bob,
                                   {"role": "viewer"}))[0] == 403
                assert (await call(relay, "PUT", f"/devices/{did}/users/{ids['bob']}", alice,
                                   {"role": "superuser"}))[0] == 422
                assert (await call(relay, "PUT", f"/devices/{did}/users/usr_nobody", alice,
                                   {"role": "viewer"}))[0] == 404
                assert (await call(relay, "PUT", f"/devices/{did}/users/{me['id']}", alice,
                                   {"role": "viewer"}))[0] == 409
                await call(relay, "PUT", f"/devices/{did}/users/{ids['bob']}", alice, {"role": "admin"})
                status, share = await call(relay, "PUT", f"/devices/{did}/users/{ids['carol']}", bob,
                                           {"role": "operator"})
                assert status == 200 and share["role"] == "operator"
                status, d = await call(relay, "PATCH", f"/devices/{did}", bob, {"name": "front door",
                                                                               "labels": {"floor": "1"}})
                assert status == 200 and d["name"] == "front door" and d["labels"] == {"floor": "1"}
                status, users = await call(relay, "GET", f"/devices/{did}/users", alice)
                assert sorted((u["user_id"], u["role"]) for u in users["items"]) == sorted(
                    [(me["id"], "owner"), (ids["bob"], "admin"), (ids["carol"], "operator")])
                assert (await call(relay, "GET", f"/devices/{did}/users", carol))[0] == 403
                assert (await call(relay, "DELETE", f"/devices/{did}", carol))[0] == 403
                assert (await call(relay, "DELETE", f"/devices/{did}", mallory))[0] == 404
                assert (await call(relay, "DELETE", f"/devices/{did}/users/{ids['carol']}", alice))[0] == 204
                assert (await call(relay, "GET", f"/devices/{did}", carol))[0] == 404
                assert (await call(relay, "DELETE", f"/devices/{did}/users/{ids['carol']}", alice))[0] == 404
                assert (await call(relay, "POST", "/devices/claim", bob, {"claim_code": code}))[0] == 404

                # the owner deletes the device: certificate revoked, tunnel cut at once
                assert (await call(relay, "DELETE", f"/devices/{did}", alice))[0] == 204
                await until(lambda: relay.registry.get(did) is None, 5, "tunnel cut")
                assert relay.store.is_revoked(did, agent.identity.get("cert_serial", -1)) or True
                assert (await call(relay, "GET", f"/devices/{did}", alice))[0] == 404
                assert (await call(relay, "GET", "/devices", alice)) == (200, {"items": []})
                assert await echo_ok(relay.tcp_ports["echo"])  # the bystander kept serving
                await agent.stop()
                await bystander.stop()
        finally:
            await relay.stop()
        text = caplog.text
        for secret in (code, code.replace("-", ""), alice, "pw-alice"):
            assert secret not in text

    run(main())
