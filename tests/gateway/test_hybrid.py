"""Hybrid connections' WebSocket mode on a real relay node (HTTPS port on
loopback), driven by an independent client: the `websockets` package, as
Microsoft's Python recipe for Azure Relay uses it. A listener holds a control
channel, gets `accept` messages and joins senders through rendezvous
addresses; every refusal is the HTTP status Azure gives."""

import asyncio
import hashlib
import json
import ssl
import time

import pytest
import websockets
from websockets.asyncio.client import connect

from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from tests.metric import value
from tests.tunnel.util import start_relay
from tests.waiting import until

ROOT = sas.SasRule("RootManageSharedAccessKey", "cm9vdC1rZXktb2YtdGhlLW5vZGUtMTIzNA==",
                   rights=frozenset({"listen", "send", "manage"}))
LISTEN = sas.SasRule("orders-listen", "b3JkZXJzLWxpc3Rlbi1rZXktMTIzNA==", rights=frozenset({"listen"}))
SEND = sas.SasRule("orders-send", "b3JkZXJzLXNlbmQta2V5LTEyMzQ1Ng==", rights=frozenset({"send"}))
CATALOG = Catalog.of([HybridConnection("orders", rules=(LISTEN, SEND)),
                      HybridConnection("open/door", requires_client_auth=False),
                      HybridConnection("nows", websocket=False, max_listeners=1)], [ROOT])


def listeners(hc, path: str) -> int:
    """Listeners the relay holds for ``path`` now (its own state: gauges are
    the process's, shared with other tests' relays)."""
    return len(hc.relay.hybrid.listeners.get(path, []))


def bad_input_at(where: str) -> float:
    """relayd_bad_input_total of one place, every kind together."""
    from prometheus_client import REGISTRY

    return sum(s.value for m in REGISTRY.collect() if m.name == "relayd_bad_input"
               for s in m.samples if s.name == "relayd_bad_input_total" and s.labels.get("where") == where)


def token(rule, path, host="localhost", ttl=600):
    return sas.make_token(f"http://{host}/{path}", rule.name, rule.primary_key, int(time.time()) + ttl)


class Hc:
    """A relay with hybrid connections, and clients for it."""

    def __init__(self, relay):
        self.relay = relay
        self.port = relay.https_port
        self.ctx = ssl.create_default_context(cafile=str(relay.ca_path))

    def url(self, path, action, **params):
        q = "&".join([f"sb-hc-action={action}"] + [f"{k}={v}" for k, v in params.items()])
        return f"wss://localhost:{self.port}/$hc/{path}?{q}"

    def listen(self, path="orders", tok=None, **params):
        headers = {} if tok == "" else {"ServiceBusAuthorization": tok or token(LISTEN, path)}
        return connect(self.url(path, "listen", **params), ssl=self.ctx, additional_headers=headers,
                       compression=None)

    def send(self, path="orders", tok=None, query="", subprotocols=None, headers=None):
        h = dict(headers or {})
        if tok is not False:
            h["ServiceBusAuthorization"] = tok or token(SEND, "orders")
        url = self.url(path, "connect").replace("?", "?" + query + "&" if query else "?")
        return connect(url, ssl=self.ctx, additional_headers=h, subprotocols=subprotocols, compression=None,
                       open_timeout=10)

    async def refused(self, coro_fn):
        with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
            async with coro_fn():
                pass
        return exc.value.response.status_code, exc.value.response.reason_phrase


def with_relay(tmp_path, body, **kw):
    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0), hybrid=CATALOG, **kw)
        try:
            await body(Hc(relay))
        finally:
            await relay.stop()

    run(main())


async def accept_and_echo(listener, rejects=None, subprotocol=None, seen=None):
    """A listener's loop, as the recipe writes it: for each accept, open the
    rendezvous and echo (or reject with ``rejects``)."""
    async for msg in listener:
        accept = json.loads(msg)["accept"]
        if seen is not None:
            seen.append(accept)
        if rejects:
            status, desc = rejects
            url = accept["address"] + f"&sb-hc-statusCode={status}&sb-hc-statusDescription={desc}"
            with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
                async with connect(url, ssl=listener.hc_ctx, compression=None):
                    pass
            assert exc.value.response.status_code == 410
            continue

        async def echo(address):
            async with connect(address, ssl=listener.hc_ctx, compression=None,
                               subprotocols=[subprotocol] if subprotocol else None) as rv:
                async for data in rv:
                    await rv.send(data)

        asyncio.ensure_future(echo(accept["address"]))


def test_a_sender_reaches_a_listener_through_a_rendezvous_and_data_flows_both_ways(tmp_path):
    async def body(hc):
        before = value("relayd_hc_sender_connections_success_total", entity="orders", mode="ws")
        connections = value("relayd_hc_active_connections", entity="orders")
        async with hc.listen() as listener:
            listener.hc_ctx = hc.ctx
            seen = []
            task = asyncio.ensure_future(accept_and_echo(listener, subprotocol="proto.a", seen=seen))
            await until(lambda: listeners(hc, "orders") == 1)
            active = value("relayd_hc_active_listeners", entity="orders")
            async with hc.send(path="orders/sub/path", query="x=1&y=%20z", subprotocols=["proto.a", "proto.b"],
                               headers={"X-App-Header": "v"}) as sender:
                assert sender.subprotocol == "proto.a"
                await sender.send("hello")
                assert await sender.recv() == "hello"
                big = bytes(range(256)) * 4096  # 1 MiB binary, both ways
                await sender.send(big)
                assert await sender.recv() == big
            accept = seen[0]
            assert accept["address"].startswith(f"wss://localhost:{hc.port}/$hc/orders/sub/path?x=1&y=%20z&")
            assert "sb-hc-action=accept" in accept["address"] and accept["id"]
            h = accept["connectHeaders"]
            assert h["X-App-Header"] == "v" and h["Sec-WebSocket-Key"] and "proto.a" in h["Sec-WebSocket-Protocol"]
            assert "ServiceBusAuthorization" not in h
            assert accept["remoteEndpoint"]["address"] == "127.0.0.1"
            task.cancel()
        assert value("relayd_hc_sender_connections_success_total", entity="orders", mode="ws") == before + 1
        await until(lambda: listeners(hc, "orders") == 0)
        assert value("relayd_hc_active_listeners", entity="orders") == active - 1
        await until(lambda: value("relayd_hc_active_connections", entity="orders") == connections)

    with_relay(tmp_path, body)


def test_a_listener_rejects_and_the_sender_gets_its_status_and_description(tmp_path):
    async def body(hc):
        async with hc.listen() as listener:
            listener.hc_ctx = hc.ctx
            task = asyncio.ensure_future(accept_and_echo(listener, rejects=(418, "Not%20today")))
            status, reason = await hc.refused(lambda: hc.send())
            assert (status, reason) == (418, "Not today")
            task.cancel()

    with_relay(tmp_path, body)


def test_an_unanswered_accept_times_out_with_504_and_the_address_dies(tmp_path):
    async def body(hc):
        hc.relay.hybrid.accept_timeout = 0.5
        async with hc.listen() as listener:
            status, reason = await hc.refused(lambda: hc.send())
            assert status == 504 and "TrackingId:" in reason
            address = json.loads(await listener.recv())["accept"]["address"]
            with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
                async with connect(address, ssl=hc.ctx):
                    pass
            assert exc.value.response.status_code == 403

    with_relay(tmp_path, body)


def test_refusals_as_azure_gives_them(tmp_path):
    async def body(hc):
        # Listeners: unknown path, no token, bad signature, a Send-only token, expired, another entity's.
        assert (await hc.refused(lambda: hc.listen("nowhere", tok=token(ROOT, "nowhere"))))[0] == 404
        assert (await hc.refused(lambda: hc.listen(tok="")))[1].startswith("MissingToken")
        bad = token(LISTEN, "orders").replace("&se=", "x&se=")
        s, r = await hc.refused(lambda: hc.listen(tok=bad))
        assert s == 401 and "token has an invalid signature" in r and "TrackingId:" in r
        assert (await hc.refused(lambda: hc.listen(tok=token(SEND, "orders"))))[:1] == (403,)
        assert (await hc.refused(lambda: hc.listen(tok=token(LISTEN, "orders", ttl=-1000))))[1].startswith(
            "ExpiredToken")
        assert (await hc.refused(lambda: hc.listen("nows", tok=token(LISTEN, "orders"))))[0] == 401  # not its rule
        assert (await hc.refused(lambda: hc.listen(tok=token(ROOT, "other"))))[0] == 403
        # Senders: no listener, a Listen-only token, WebSocket connects disabled.
        s, r = await hc.refused(lambda: hc.send())
        assert s == 404 and "Endpoint does not exist" in r
        async with hc.listen():
            assert (await hc.refused(lambda: hc.send(tok=token(LISTEN, "orders"))))[0] == 403
            assert (await hc.refused(lambda: hc.send(tok=False)))[0] == 401
        async with hc.listen("nows", tok=token(ROOT, "nows")):
            assert (await hc.refused(lambda: hc.listen("nows", tok=token(ROOT, "nows"))))[1].startswith(
                "MaximumListenersPerEndpoint")
            assert (await hc.refused(lambda: hc.send("nows", tok=token(ROOT, "nows"))))[0] == 404
        # A made-up rendezvous address.
        with pytest.raises(websockets.exceptions.InvalidStatus) as exc:
            async with connect(hc.url("orders", "accept", **{"sb-hc-rendezvous": "guess"}), ssl=hc.ctx):
                pass
        assert exc.value.response.status_code == 403

    with_relay(tmp_path, body)


def test_an_anonymous_entity_takes_senders_without_a_token(tmp_path):
    async def body(hc):
        async with hc.listen("open/door", tok=token(ROOT, "open/door")) as listener:
            listener.hc_ctx = hc.ctx
            task = asyncio.ensure_future(accept_and_echo(listener))
            async with hc.send("open/door/x", tok=False) as sender:
                await sender.send(b"anon")
                assert await sender.recv() == b"anon"
            task.cancel()

    with_relay(tmp_path, body)


def test_renew_token_and_a_refused_renewal_closes_the_channel_with_1008(tmp_path):
    async def body(hc):
        async with hc.listen() as listener:
            await listener.send(json.dumps({"renewToken": {"token": token(LISTEN, "orders", ttl=7200)}}))
            await listener.send(json.dumps({"someFutureCommand": {}}))  # ignored
            await listener.send("not json")  # counted, ignored
            await listener.ping()
            await listener.send(json.dumps({"renewToken": {"token": token(SEND, "orders")}}))
            with pytest.raises(websockets.exceptions.ConnectionClosed) as exc:
                await asyncio.wait_for(listener.recv(), 10)
            assert exc.value.rcvd.code == 1008

    with_relay(tmp_path, body)


def test_listeners_of_a_deleted_hybrid_connection_are_closed_with_1001(tmp_path):
    async def body(hc):
        async with hc.listen() as listener:
            hc.relay.store.hc_create(HybridConnection("later"))
            hc.relay.cfg.hybrid = Catalog.of([HybridConnection("open/door", requires_client_auth=False)], [ROOT])
            await hc.relay.hybrid_catalog_changed()
            with pytest.raises(websockets.exceptions.ConnectionClosed) as exc:
                await asyncio.wait_for(listener.recv(), 10)
            assert exc.value.rcvd.code == 1001
        # The data directory's hybrid connection is served too.
        async with hc.listen("later", tok=token(ROOT, "later")):
            pass

    with_relay(tmp_path, body)


def test_hostile_clients_end_only_their_own_connection(tmp_path):
    """Garbage frames on a control channel, a plain request on $hc, a sender
    that talks before its answer, a huge control message: each is refused or
    closed alone, counted, while a spliced sender-listener pair beside them
    keeps flowing."""

    async def body(hc):
        async with hc.listen() as listener:
            listener.hc_ctx = hc.ctx
            task = asyncio.ensure_future(accept_and_echo(listener))
            async with hc.send() as bystander:
                await bystander.send(b"before")
                assert await bystander.recv() == b"before"

                # A second listener that sends a frame with a reserved opcode.
                before = bad_input_at("hybrid")
                r, w = await asyncio.open_connection("127.0.0.1", hc.port, ssl=hc.ctx, server_hostname="localhost")
                tok = token(LISTEN, "orders")
                w.write(f"GET /$hc/orders?sb-hc-action=listen HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        f"Sec-WebSocket-Version: 13\r\nServiceBusAuthorization: {tok}\r\n\r\n".encode())
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
                w.write(b"\x83\x80\x00\x00\x00\x00")  # opcode 3, masked, empty
                closing = await asyncio.wait_for(r.read(), 10)
                assert closing[:1] == b"\x88" and closing[2:4] == (1002).to_bytes(2, "big")
                w.close()
                assert bad_input_at("hybrid") == before + 1

                # A plain request on $hc: 400, nothing else.
                r, w = await asyncio.open_connection("127.0.0.1", hc.port, ssl=hc.ctx, server_hostname="localhost")
                w.write(b"GET /$hc/orders?sb-hc-action=listen HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert (await asyncio.wait_for(r.read(), 10)).startswith(b"HTTP/1.1 400 ")
                w.close()

                # A sender that sends 100 KiB before its answer: cut.
                r, w = await asyncio.open_connection("127.0.0.1", hc.port, ssl=hc.ctx, server_hostname="localhost")
                w.write(f"GET /$hc/orders?sb-hc-action=connect HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                        f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        f"Sec-WebSocket-Version: 13\r\nServiceBusAuthorization: {token(SEND, 'orders')}\r\n\r\n"
                        .encode() + b"x" * 100_000)
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
                    data = await asyncio.wait_for(r.read(), 10)
                    if not data.startswith(b"HTTP/1.1 101"):
                        raise ConnectionResetError("cut")
                w.close()
                await until(lambda: not hc.relay.hybrid.pending)

                # A control message over 64 KiB: counted and ignored.
                before = bad_input_at("hybrid")
                await listener.send(json.dumps({"renewToken": {"token": "x" * 70_000}}))
                await until(lambda: bad_input_at("hybrid") == before + 1)

                await bystander.send(b"after")
                assert await bystander.recv() == b"after"
            task.cancel()

    with_relay(tmp_path, body)


# -- HTTP mode -------------------------------------------------------------------------------------


async def http_listener(hc, path="orders", stream_chunks=None, rendezvous_response=False, seen=None):
    """A listener that answers each HTTP-mode request with its method, target
    and body length (as the recipe for the protocol's HTTP mode goes)."""
    async with hc.listen(path, tok=token(ROOT, path)) as ch:
        async for msg in ch:
            req = json.loads(msg)["request"]
            if seen is not None:
                seen.append(req)
            if "method" not in req:  # deferred: the request comes on a rendezvous
                async with connect(req["address"], ssl=hc.ctx, compression=None, max_size=None) as rv:
                    full = json.loads(await rv.recv())["request"]
                    if seen is not None:
                        seen.append(full)
                    body = await rv.recv() if full["body"] else b""
                    await answer(rv, full, body, stream_chunks)
                continue
            body = await ch.recv() if req["body"] else b""
            if rendezvous_response:
                async with connect(req["address"], ssl=hc.ctx, compression=None) as rv:
                    await answer(rv, req, body, stream_chunks)
            else:
                await answer(ch, req, body, stream_chunks)


async def answer(ws, req, body, stream_chunks=None):
    text = f"{req['method']} {req['requestTarget']} {len(body)} {hashlib.sha256(body).hexdigest()}".encode()
    await ws.send(json.dumps({"response": {"requestId": req["id"], "statusCode": 201, "statusDescription": "Made",
                                           "responseHeaders": {"content-type": "text/plain", "x-bad": "a\r\nb",
                                                               "Content-Length": "999"},
                                           "body": True}}))
    if stream_chunks:
        async def parts():
            for c in stream_chunks:
                yield c
        await ws.send(parts())
    else:
        await ws.send(text)


def https_request(hc, method, path, body=b"", headers=None, version="HTTP/1.1"):
    """One request over TLS with http.client; (status, reason, headers, body)."""
    import http.client

    conn = http.client.HTTPSConnection("localhost", hc.port, context=hc.ctx, timeout=20)
    if version == "HTTP/1.0":
        conn._http_vsn, conn._http_vsn_str = 10, "HTTP/1.0"
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, r.reason, dict(r.getheaders()), data


def test_http_mode_small_and_large_bodies_both_ways(tmp_path):
    import hashlib as _h

    async def body(hc):
        seen = []
        task = asyncio.ensure_future(http_listener(hc, seen=seen))
        await until(lambda: listeners(hc, "orders") == 1)
        tok = token(SEND, "orders")
        loop = asyncio.get_running_loop()
        for size in (0, 1024, 200_000):
            payload = bytes(range(256)) * (size // 256)
            status, reason, headers, data = await loop.run_in_executor(None, lambda: https_request(
                hc, "POST", "/orders/items/7?x=1&sb-hc-id=hidden", payload,
                {"ServiceBusAuthorization": tok, "X-App": "1"}))
            assert (status, reason) == (201, "Made")
            assert data == f"POST /orders/items/7?x=1 {len(payload)} {_h.sha256(payload).hexdigest()}".encode()
            assert headers["Via"] == "1.1 localhost" and "x-bad" not in headers
        req = next(r for r in seen if r.get("method") == "POST" and r["body"])
        assert req["requestHeaders"]["X-App"] == "1" and "ServiceBusAuthorization" not in req["requestHeaders"]
        assert any("method" not in r for r in seen)  # the 200 KB one went over a rendezvous
        # HEAD and an unauthorized request on the same kind of connection.
        status, _, headers, data = await loop.run_in_executor(None, lambda: https_request(
            hc, "HEAD", "/orders", headers={"ServiceBusAuthorization": tok}))
        assert status == 201 and data == b""
        status, reason, _, _ = await loop.run_in_executor(None, lambda: https_request(hc, "GET", "/orders"))
        assert status == 401 and reason.startswith("MissingToken")
        task.cancel()

    with_relay(tmp_path, body)


def test_http_mode_streams_a_response_as_the_listener_writes_it(tmp_path):
    async def body(hc):
        chunks = [b"data: %d\n\n" % i for i in range(20)] + [b""]
        task = asyncio.ensure_future(http_listener(hc, "open/door", stream_chunks=chunks, rendezvous_response=True))
        await until(lambda: listeners(hc, "open/door") == 1)
        r, w = await asyncio.open_connection("127.0.0.1", hc.port, ssl=hc.ctx, server_hostname="localhost")
        w.write(b"GET /open/door/events HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % hc.port)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 201 Made") and b"Transfer-Encoding: chunked" in head
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            got += await asyncio.wait_for(r.read(65536), 10)
        assert got.count(b"data: ") == 20
        w.close()
        task.cancel()

    with_relay(tmp_path, body)


def test_http_mode_without_a_listener_is_502_and_a_lost_listener_fails_its_request(tmp_path):
    async def body(hc):
        loop = asyncio.get_running_loop()
        status, reason, _, _ = await loop.run_in_executor(None, lambda: https_request(hc, "GET", "/open/door"))
        assert status == 502 and "No listener" in reason
        async with hc.listen("open/door", tok=token(ROOT, "open/door")) as ch:
            fut = loop.run_in_executor(None, lambda: https_request(hc, "GET", "/open/door/x"))
            json.loads(await ch.recv())
        status, _, _, _ = await fut  # the listener left without answering
        assert status == 502

    with_relay(tmp_path, body)


def test_allowed_and_disallowed_listeners(tmp_path):
    async def body(hc):
        a_id, b_id = "0f2c6a5e-1111-4a63-9a51-0d6c2f1e8b22", "7f3c2a9e-2222-4a63-9a51-0d6c2f1e8b22"
        async with hc.listen(**{"sb-hc-id": a_id + "_G3"}) as a, hc.listen(**{"sb-hc-id": b_id}) as b:
            got = {"a": 0, "b": 0}

            async def count(name, ch):
                async for _ in ch:
                    got[name] += 1

            tasks = [asyncio.ensure_future(count("a", a)), asyncio.ensure_future(count("b", b))]
            hc.relay.hybrid.accept_timeout = 0.2
            for headers in ({"Microsoft-Relay-AllowedListeners": b_id.upper()},
                            {"Microsoft-Relay-DisallowedListeners": f"{a_id}, x"}):
                for _ in range(3):
                    assert (await hc.refused(lambda: hc.send(headers=headers)))[0] == 504  # nobody accepts
            assert got == {"a": 0, "b": 6}
            s, r = await hc.refused(lambda: hc.send(headers={"Microsoft-Relay-AllowedListeners": "nobody"}))
            assert s == 404 and "AllowedListeners/DisallowedListeners" in r
            for t in tasks:
                t.cancel()

    with_relay(tmp_path, body)


def test_admin_hc_list_shows_the_listeners(tmp_path):
    import subprocess

    from tests.tunnel.processes import RELAYD

    async def body(hc):
        hc.relay.store.hc_create(HybridConnection("stored"))
        await hc.relay.hybrid_catalog_changed()
        async with hc.listen(**{"sb-hc-id": "abc-123"}), hc.listen("stored", tok=token(ROOT, "stored")):
            path = hc.relay.data / "hybrid-listeners.json"
            await until(lambda: path.exists() and b"abc-123" in path.read_bytes() and b"stored" in path.read_bytes())
            out = subprocess.run(RELAYD + ["admin", "hc", "list", "--data", str(hc.relay.data)], capture_output=True,
                                 text=True, timeout=60).stdout
            row = next(line for line in out.splitlines() if line.startswith("stored "))
            assert row.split()[6] == "1"
            row = next(line for line in out.splitlines() if line.startswith("orders "))
            assert "(from the relay's config)" in row and row.split()[-1] == "1"
            assert "listener of orders: abc-123 since " in out and "from 127.0.0.1:" in out
        await until(lambda: b"abc-123" not in (hc.relay.data / "hybrid-listeners.json").read_bytes())

    with_relay(tmp_path, body)


def test_http_mode_streams_bodies_larger_than_any_websocket_message_limit(tmp_path):
    """A 20 MiB response, written by the listener as one fragmented message,
    reaches the sender whole: the relay passes it part by part."""

    async def body(hc):
        chunks = [bytes([i]) * (1 << 20) for i in range(20)] + [b""]
        task = asyncio.ensure_future(http_listener(hc, "open/door", stream_chunks=chunks, rendezvous_response=True))
        await until(lambda: listeners(hc, "open/door") == 1)
        loop = asyncio.get_running_loop()
        status, _, _, data = await loop.run_in_executor(None, lambda: https_request(hc, "GET", "/open/door/big"))
        assert status == 201 and data == b"".join(chunks)
        task.cancel()

    with_relay(tmp_path, body)


def test_http_mode_large_headers_go_over_a_rendezvous(tmp_path):
    async def body(hc):
        seen = []
        task = asyncio.ensure_future(http_listener(hc, "open/door", seen=seen))
        await until(lambda: listeners(hc, "open/door") == 1)
        loop = asyncio.get_running_loop()
        big = {f"X-Big-{i}": "v" * 900 for i in range(40)}  # about 36 KB of headers (a 64 KiB max_head), a small body
        status, _, _, data = await loop.run_in_executor(None, lambda: https_request(hc, "POST", "/open/door/h",
                                                                                     b"tiny", big))
        assert status == 201 and data.startswith(b"POST /open/door/h 4 ")
        assert "method" not in seen[0] and seen[1]["requestHeaders"]["X-Big-39"] == "v" * 900
        task.cancel()

    from relayd.core.http1 import HttpLimits

    with_relay(tmp_path, body, http_limits=HttpLimits(max_head=64 * 1024))
