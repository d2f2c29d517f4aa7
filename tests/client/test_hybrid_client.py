"""relayd's Python client for hybrid connections (relayd.client.hybrid),
against a real relay node: listener and sender in both modes, through a
connection string, with reconnection after the relay goes away and comes
back, and its refusals."""

import asyncio
import hashlib
import ssl

import pytest

from relayd.client import hybrid
from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from tests.tunnel.test_proxy import tinyproxy  # noqa: F401  (the fixture)
from tests.tunnel.util import start_relay
from tests.waiting import until

ROOT = sas.SasRule("RootManageSharedAccessKey", "cm9vdC1rZXktb2YtdGhlLW5vZGUtMTIzNA==",
                   rights=frozenset({"listen", "send", "manage"}))
CATALOG = Catalog.of([HybridConnection("orders"), HybridConnection("open", requires_client_auth=False)], [ROOT])


def cs_for(relay, path="orders", key=ROOT.primary_key):
    return hybrid.parse_connection_string(f"Endpoint=sb://localhost:{relay.https_port}/;SharedAccessKeyName="
                                          f"{ROOT.name};SharedAccessKey={key};EntityPath={path}")


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def answer(req):
    if req.target.endswith("/fail"):
        raise RuntimeError("listener bug")
    body = req.body * (100 if req.target.endswith("/big") else 1)
    return hybrid.Response(201, {"x-len": str(len(req.body)), "content-type": "application/octet-stream"}, body,
                           "Made")


def with_relay(tmp_path, body, port=0):
    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", port), hybrid=CATALOG)
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        try:
            await body(relay, ctx)
        finally:
            await relay.stop()

    run(main())


def test_listener_and_sender_in_both_modes(tmp_path):
    async def body(relay, ctx):
        cs = cs_for(relay)
        listener = hybrid.Listener(cs, on_accept=echo, on_request=answer, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        async with await hybrid.connect(cs, suffix="a/b", query="q=1", subprotocols=["p1"], ssl=ctx) as ws:
            assert ws.subprotocol == "p1"
            for message in (b"\x01" * 300_000, "text", b""):
                await ws.send(message)
                assert await ws.recv() == message
        for size in (0, 1000, 100_000):
            data = bytes(range(256)) * (size // 256)
            status, headers, got = await hybrid.request(cs, "POST", "/items?x=1", data, ssl=ctx)
            assert (status, headers["x-len"], got) == (201, str(len(data)), data)
        status, _, got = await hybrid.request(cs, "PUT", "/big", b"y" * 1000, ssl=ctx)  # 100 KB back
        assert status == 201 and got == b"y" * 100_000
        status, _, _ = await hybrid.request(cs, "GET", "/fail", ssl=ctx)
        assert status == 500
        await listener.close()
        await asyncio.wait_for(task, 10)

    with_relay(tmp_path, body)


def test_anonymous_senders_and_refusals(tmp_path):
    async def body(relay, ctx):
        listener = hybrid.Listener(cs_for(relay, "open"), on_accept=echo, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        async with await hybrid.connect(cs_for(relay, "open"), anonymous=True, ssl=ctx) as ws:
            await ws.send("anon")
            assert await ws.recv() == "anon"
        with pytest.raises(hybrid.HandshakeRefused) as exc:
            await hybrid.connect(cs_for(relay, "orders"), anonymous=True, ssl=ctx)
        assert exc.value.status == 401
        bad = cs_for(relay, "orders", key="d3Jvbmcta2V5LW9mLXRoZS1ub2Rl")
        with pytest.raises(hybrid.HandshakeRefused) as exc:
            await hybrid.Listener(bad, ssl=ctx).run()  # refused for good: raised, not retried
        assert exc.value.status == 401 and "invalid signature" in exc.value.reason
        await listener.close()
        await asyncio.wait_for(task, 10)

    with_relay(tmp_path, body)


def test_a_listener_reconnects_when_the_relay_comes_back(tmp_path):
    from tests.tunnel.processes import free_port

    port = free_port()

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", port), hybrid=CATALOG)
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        listener = hybrid.Listener(cs_for(relay), on_accept=echo, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        await relay.stop()
        await until(lambda: not listener.online.is_set())
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", port), hybrid=CATALOG)
        try:
            await until(lambda: listener.connects == 2, timeout=20)
            async with await hybrid.connect(cs_for(relay), ssl=ctx) as ws:
                await ws.send(b"again")
                assert await ws.recv() == b"again"
        finally:
            await listener.close()
            await asyncio.wait_for(task, 10)
            await relay.stop()

    run(main())


def test_listener_and_sender_through_a_forward_proxy(tmp_path, tinyproxy):
    """Both ends behind a real tinyproxy (CONNECT with credentials): the
    proxy's log shows the tunnels to the relay."""
    proxy_port, proxy_log = tinyproxy
    proxy = f"http://relay:s3cret@127.0.0.1:{proxy_port}"

    async def body(relay, ctx):
        cs = cs_for(relay)
        listener = hybrid.Listener(cs, on_accept=echo, on_request=answer, ssl=ctx, proxy=proxy)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        async with await hybrid.connect(cs, ssl=ctx, proxy=proxy) as ws:
            await ws.send(b"via the proxy")
            assert await ws.recv() == b"via the proxy"
        await listener.close()
        await asyncio.wait_for(task, 10)
        assert proxy_log.read_text().count(f"localhost:{relay.https_port}") >= 3  # control, sender, rendezvous

    with_relay(tmp_path, body)


def test_a_key_rotation_keeps_listeners_whose_token_is_still_good(tmp_path):
    async def body(relay, ctx):
        relay.store.hc_create(HybridConnection("rotating"))
        relay.store.hc_rule_add("rotating", sas.SasRule("r", "the-first-key-0123456", rights=frozenset({"listen",
                                                                                                         "send"})))
        await relay.hybrid_catalog_changed()
        old = hybrid.parse_connection_string(f"Endpoint=sb://localhost:{relay.https_port}/;SharedAccessKeyName=r;"
                                             "SharedAccessKey=the-first-key-0123456;EntityPath=rotating")
        listener = hybrid.Listener(old, on_accept=echo, ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)
        relay.store.hc_rule_rotate("rotating", "r", "the-second-key-654321")
        await relay.hybrid_catalog_changed()
        # The listener stays; a sender with the old key (now the secondary) and one with the new key get through.
        new = hybrid.parse_connection_string(str(old).replace("the-first-key-0123456", "the-second-key-654321"))
        for cs in (old, new):
            async with await hybrid.connect(cs, ssl=ctx) as ws:
                await ws.send(b"k")
                assert await ws.recv() == b"k"
        assert listener.connects == 1
        await listener.close()
        await asyncio.wait_for(task, 10)

    with_relay(tmp_path, body)
