"""The Redis event bus (relayd serve --redis URL; docs/device-cloud.md) against
a real redis-server from Debian, started here on a loopback port and
stopped by its PID: two relays on one Redis see each other's device
events, a device's presence key lives while its tunnel does and expires
when its relay vanishes, and a Redis that goes away costs events (counted,
logged), never tunnels."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys

import orjson
import pytest
import redis as redis_sync

from relayd.agent import AgentNode
from relayd.config import AgentConfig
from relayd.control.events import DEVICE_CONNECTED, DEVICE_DISCONNECTED
from relayd.control.jointoken import JoinToken
from relayd.control.store import open_data_dir
from relayd.net import run
from tests.gateway.devices import relay_with_https
from tests.gateway.test_devicereg import call, enrolled_device, local_token
from tests.metric import value
from tests.tunnel.processes import free_port, stop_pid
from tests.tunnel.util import FAST_MUX, echo_ok, echo_service
from tests.waiting import until, until_sync, listening

REDIS = shutil.which("redis-server")


@pytest.fixture
def redis_url(tmp_path):
    if REDIS is None:
        pytest.fail("redis-server is missing: run the test command (scripts/test.sh), which installs it")
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until_sync(lambda: listening(port), 10, "redis-server listening")
        url = f"redis://127.0.0.1:{port}/0"
        yield url, proc
    finally:
        stop_pid(proc)


def test_two_relays_on_one_redis_see_each_others_device_events(tmp_path, redis_url):
    url, _ = redis_url
    client = redis_sync.Redis.from_url(url)

    async def main():
        a = await relay_with_https(tmp_path / "a", redis=url, redis_presence_ttl=3)
        b = await relay_with_https(tmp_path / "b", redis=url, redis_presence_ttl=3)
        seen_a, seen_b = [], []
        a.bus.subscribe(seen_a.append)
        b.bus.subscribe(seen_b.append)
        await until(lambda: a.bus.subscribed.is_set() and b.bus.subscribed.is_set(), 10, "subscribed")
        try:
            async with echo_service() as port:
                dev_a = await enrolled_device(tmp_path, a, "cam-a", {"echo": ("127.0.0.1", port)})
                dev_b = await enrolled_device(tmp_path, b, "cam-b", {"echo": ("127.0.0.1", port)})
                ida, idb = dev_a.identity["agent_id"], dev_b.identity["agent_id"]

                def got(seen, kind, did):
                    return [e for e in seen if e.type == kind and e.subject == did]

                ev = (await until(lambda: got(seen_b, DEVICE_CONNECTED, ida), 10, "b sees a's device"))[0]
                assert ev.data["node"] == a.node_name and ev.data["device_id"] == ida
                await until(lambda: got(seen_a, DEVICE_CONNECTED, idb), 10, "a sees b's device")
                assert len(got(seen_a, DEVICE_CONNECTED, ida)) == 1  # its own once, not echoed back by Redis
                # presence: the node and a TTL that is refreshed
                key = f"relayd:device:{ida}"
                doc = orjson.loads(client.get(key))
                assert doc["node"] == a.node_name
                assert 0 < client.ttl(key) <= 3
                await asyncio.sleep(2.5)
                assert client.exists(key) and client.ttl(key) > 0  # refreshed past the first TTL
                await dev_a.stop()
                ev = (await until(lambda: got(seen_b, DEVICE_DISCONNECTED, ida), 10, "b sees a's device go"))[0]
                assert ev.data["node"] == a.node_name and ev.data["reason"]
                await until(lambda: not client.exists(key), 5, "presence key deleted")
                assert client.exists(f"relayd:device:{idb}")
                await dev_b.stop()
        finally:
            await a.stop()
            await b.stop()

    try:
        run(main())
    finally:
        client.close()


def test_presence_key_expires_when_the_relay_vanishes(tmp_path, redis_url):
    """A relay process killed (SIGKILL: nothing deleted) leaves its
    device's presence key to expire by its TTL."""
    url, _ = redis_url
    client = redis_sync.Redis.from_url(url)
    data = tmp_path / "relay"
    conf = tmp_path / "relay.toml"
    conf.write_text(f'[serve]\nredis = "{url}"\nredis_presence_ttl = "2s"\n')
    proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "--config", str(conf), "--data", str(data),
                             "--agents", "127.0.0.1:0", "--tcp", "echo=127.0.0.1:0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def main():
        info = await until(lambda: orjson.loads((data / "relay.json").read_bytes()), 20, "relay.json",
                           ignore=(OSError, orjson.JSONDecodeError))
        ca, store = open_data_dir(data, create=False)
        try:
            token_id, secret = store.create_join_token([], 900)
            token = JoinToken(info["advertised"], ca.pin, token_id, secret).encode()
            agent = AgentNode(AgentConfig(data=tmp_path / "dev", join=token, endpoints={"echo": ("127.0.0.1", 9)},
                                          mux=FAST_MUX, reconnect_max=1.0))
            ident = await agent.enroll(token)
            store.register_device(ident["agent_id"], "cam")
        finally:
            store.close()
        await agent.start()
        key = f"relayd:device:{ident['agent_id']}"
        try:
            await until(lambda: client.exists(key), 10, "presence key set")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
            assert client.exists(key)
            await until(lambda: not client.exists(key), 5, "presence key expired")
        finally:
            await agent.stop()

    try:
        run(main())
    finally:
        stop_pid(proc)
        client.close()


def test_redis_down_costs_events_never_tunnels(tmp_path, redis_url, caplog):
    caplog.set_level(logging.WARNING, logger="relayd.events")
    url, server = redis_url

    async def main():
        relay = await relay_with_https(tmp_path, redis=url, redis_presence_ttl=3)
        seen = []
        relay.bus.subscribe(seen.append)
        await until(relay.bus.subscribed.is_set, 10, "subscribed")
        try:
            async with echo_service() as port:
                dev = await enrolled_device(tmp_path, relay, "cam", {"echo": ("127.0.0.1", port)})
                did = dev.identity["agent_id"]
                await until(lambda: [e for e in seen if e.type == DEVICE_CONNECTED], 10, "connected")
                stop_pid(server)
                before = sum(value("relayd_event_bus_errors_total", op=op) for op in ("publish", "presence", "subscribe"))
                dev.conn.abort()  # the device reconnects: two events and a presence write, Redis gone
                await until(lambda: len([e for e in seen if e.type == DEVICE_CONNECTED]) >= 2, 15, "reconnected")
                assert [e for e in seen if e.type == DEVICE_DISCONNECTED and e.subject == did]  # local subscribers
                await until(lambda: sum(value("relayd_event_bus_errors_total", op=op)
                                        for op in ("publish", "presence", "subscribe")) >= before + 2, 10, "counted")
                assert await echo_ok(relay.tcp_ports["echo"])  # tunnels keep serving
                assert relay.registry.get(did) is not None
                await dev.stop()
        finally:
            await relay.stop()
        assert "event bus: redis" in caplog.text

    run(main())


def test_a_claim_and_a_delete_on_one_relay_reach_the_device_on_another(tmp_path, redis_url):
    """Two relays of one data directory (one store) on one Redis: a device's
    tunnel ends at relay a; its owner claims it, and later deletes it, through
    relay b's API. The claim reaches the device (a pushes it down the tunnel:
    the agent removes its claim code file) and the delete cuts its tunnel at
    a, through Redis; a bystander device on a keeps its stream."""
    url, _ = redis_url

    async def main():
        a = await relay_with_https(tmp_path, redis=url)
        b = await relay_with_https(tmp_path, redis=url)
        assert a.data == b.data and a.node_name != b.node_name
        seen_b = []
        b.bus.subscribe(seen_b.append)
        await until(lambda: a.bus.subscribed.is_set() and b.bus.subscribed.is_set(), 10, "subscribed")
        a.zt.ctl.add_user("alice", "pw-alice-0123456789", email="alice@example.com")
        try:
            async with echo_service() as port:
                bystander = await enrolled_device(tmp_path, a, "bystander", {"echo": ("127.0.0.1", port)})
                dev = await enrolled_device(tmp_path, a, "cam", {"cam": ("127.0.0.1", port)})
                did = dev.identity["agent_id"]
                await until(dev.claim_code_file.exists, 10, "claim code file")
                code = dev.claim_code_file.read_text().strip()
                await until(lambda: [e for e in seen_b if e.type == DEVICE_CONNECTED and e.subject == did], 10,
                            "b sees the device come up at a")
                alice = await local_token(b, "alice", "pw-alice-0123456789")
                status, doc = await call(b, "POST", "/devices/claim", alice, {"claim_code": code})
                assert (status, doc) == (200, {"device_id": did, "role": "owner"})
                await until(lambda: not dev.claim_code_file.exists(), 10, "claim pushed by relay a")
                status, lst = await call(b, "GET", "/devices", alice)
                assert [(d["id"], d["state"], d["role"]) for d in lst["items"]] == [(did, "online", "owner")]
                # the delete at b cuts the tunnel at a, and the device cannot come back
                long = asyncio.ensure_future(echo_ok(a.tcp_ports["echo"], size=4_000_000))
                assert (await call(b, "DELETE", f"/devices/{did}", alice))[0] == 204
                await until(lambda: not dev.connected.is_set(), 10, "tunnel cut at relay a")
                assert await long and await echo_ok(a.tcp_ports["echo"])
                assert (await call(a, "GET", f"/devices/{did}", alice))[0] == 404
                await dev.stop()
                await bystander.stop()
        finally:
            await a.stop()
            await b.stop()

    run(main())
