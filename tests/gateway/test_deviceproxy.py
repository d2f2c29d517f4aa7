"""The device proxy (issue 13 item 5): a user's proxy token from POST
/api/v1/token, checked from outside by PyJWT against /.well-known/jwks.json;
with it, /api/v1/devices/{id}/proxy/... reaches the device's local service
through its tunnel: large bodies streamed both ways (SHA-256 checked), a
WebSocket echo, roles per method, a revoked share refused at once, an
offline device, a dead service and a slow one; hostile tokens and paths each
refused with its status, a metric and a log line without the token, while a
bystander stream through the same agent goes on."""

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import time

import jwt
import orjson
import websockets
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd.control import deviceproxy, jws
from relayd.control.api import ApiError
from relayd.net import run
from tests.gateway.devices import http_request, https, relay_with_https, start_device
from tests.metric import value
from tests.tunnel.util import echo_service

BIG = 6 * 1024 * 1024


def fake_user_auth(head, cred):
    """Stands in for the device API's user sign-in (not landed yet): the
    user id in a header."""
    v = head.get(b"x-test-user")
    if not v:
        raise ApiError(401, "unauthorized", "no user")
    return v.decode()


def result(name: str) -> float:
    return value("relayd_device_proxy_requests_total", result=name)


def add_user(relay, uid: str) -> None:
    with relay.store.transaction() as db:
        db.execute("INSERT INTO dc_users(id, iss, sub, created_at) VALUES (?, 'https://idp.test', ?, ?)",
                   (uid, uid, time.time()))


def share(relay, device: str, uid: str, role: str | None) -> None:
    with relay.store.transaction() as db:
        db.execute("DELETE FROM dc_shares WHERE device_id = ? AND user_id = ?", (device, uid))
        if role:
            db.execute("INSERT INTO dc_shares(device_id, user_id, role, granted_at) VALUES (?, ?, ?, ?)",
                       (device, uid, role, time.time()))


def set_owner(relay, device: str, uid: str) -> None:
    with relay.store.transaction() as db:
        db.execute("UPDATE dc_devices SET owner = ? WHERE id = ?", (uid, device))


# -- the device's local service: plain HTTP/1.1 and a WebSocket echo ----------------------------------


def blob(n: int) -> bytes:
    return hashlib.shake_256(b"relayd-proxy").digest(n)


async def device_service(seen: list):
    async def handle(r, w):
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                fields = [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines[1:] if x)]
                hdrs = dict(fields)
                seen.append({"method": method, "target": target, "headers": fields})
                if hdrs.get("upgrade", "").lower() == "websocket":
                    accept = base64.b64encode(hashlib.sha1(hdrs["sec-websocket-key"].encode()
                                                           + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                    await ws_echo(r, w)
                    return
                n = int(hdrs.get("content-length", "0"))
                h = hashlib.sha256()
                while n:
                    piece = await r.read(min(n, 65536))
                    if not piece:
                        return
                    h.update(piece)
                    n -= len(piece)
                if target.startswith("/big"):
                    body = blob(BIG)
                elif target.startswith("/slow"):
                    await asyncio.sleep(3)
                    body = b"late"
                else:
                    body = orjson.dumps({"sha256": h.hexdigest(), "target": target, "method": method})
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                        % len(body))
                if method != "HEAD":
                    w.write(body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def ws_echo(r, w):
    while True:
        b0, b1 = await r.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await r.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await r.readexactly(8), "big")
        mask = await r.readexactly(4)
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await r.readexactly(n)))
        op = b0 & 0x0F
        hdr = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big"))
        w.write(hdr + data)
        await w.drain()
        if op == 8:
            return


# -- the client side ---------------------------------------------------------------------------


async def call(relay, method: str, path: str, token: str | None = None, body: bytes = b"", headers=None,
               stream: int = 0, timeout: float = 20) -> tuple[int, dict, bytes]:
    """One request on its own connection; ``stream``: a body of that many
    bytes written in pieces as the connection drains. (status, headers, body)."""
    ctx = ssl.create_default_context(cafile=str(relay.ca_path))
    hdrs = {"Host": "127.0.0.1", "Connection": "close", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body or stream or method in ("POST", "PUT"):
        hdrs["Content-Length"] = str(stream or len(body))

    data = blob(stream) if stream else b""
    pieces = [data[i:i + 256 * 1024] for i in range(0, len(data), 256 * 1024)]
    return await http_request("127.0.0.1", relay.https_port, method, path, body, hdrs, ctx, timeout, pieces)


async def token_for(relay, user: str, device: str | None = None) -> str:
    body = orjson.dumps({"device_id": device}) if device else b""
    hdrs = {"X-Test-User": user, **({"Content-Type": "application/json"} if body else {})}
    status, _, data = await https(relay, "POST", "/api/v1/token", body, hdrs)
    assert status == 200, data
    doc = orjson.loads(data)
    assert doc["token_type"] == "Bearer" and doc["expires_in"] == 300
    return doc["token"]


async def owned_device(tmp_path, relay, svc, echo: int, users=()):
    """Users ``owner`` and ``users``, signed in by fake_user_auth, and a
    device owned by ``owner`` offering its service (``device``) and an echo
    (the bystander): (agent, device id, the service's port)."""
    relay.device_proxy.user_auth = fake_user_auth
    for u in ("owner", *users):
        add_user(relay, u)
    port = svc.sockets[0].getsockname()[1]
    dev = await start_device(tmp_path, relay, "d1", {"device": ("127.0.0.1", port), "echo": ("127.0.0.1", echo)})
    did = dev.identity["agent_id"]
    set_owner(relay, did, "owner")
    return dev, did, port


def error_of(body: bytes) -> str:
    doc = orjson.loads(body)
    assert set(doc) == {"error", "message"}
    return doc["error"]


def test_proxy_streams_bodies_websockets_and_enforces_roles(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        relay = await relay_with_https(tmp_path, gateway_timeout=1.5)
        seen: list = []
        svc = await device_service(seen)
        async with echo_service() as echo:
            dev, did, port = await owned_device(tmp_path, relay, svc, echo, ("viewer", "operator", "stranger"))
            share(relay, did, "viewer", "viewer")
            share(relay, did, "operator", "operator")
            base = f"/api/v1/devices/{did}/proxy"

            # the owner's token: all their devices; checked from outside with PyJWT and the JWK set
            tok = await token_for(relay, "owner")
            status, hdrs, jwks = await https(relay, "GET", "/.well-known/jwks.json")
            assert status == 200 and hdrs["content-type"] == "application/json"
            keyset = jwt.PyJWKSet.from_dict(orjson.loads(jwks))
            kid = jwt.get_unverified_header(tok)["kid"]
            key = next(k for k in keyset.keys if k.key_id == kid)
            claims = jwt.decode(tok, key.key, algorithms=["EdDSA"], audience="relayd-device-proxy",
                                issuer=f"https://{relay.wss_address}")
            assert claims["sub"] == "owner" and claims["devs"] == {did: "owner"}
            assert claims["exp"] - claims["iat"] == 300 and claims["jti"]
            with_one = await token_for(relay, "viewer", did)
            assert jwt.decode(with_one, key.key, algorithms=["EdDSA"], audience="relayd-device-proxy",
                              issuer=f"https://{relay.wss_address}")["devs"] == {did: "viewer"}
            assert (await https(relay, "POST", "/api/v1/token", orjson.dumps({"device_id": did}),
                                {"X-Test-User": "stranger", "Content-Type": "application/json"}))[0] == 404
            assert (await https(relay, "POST", "/api/v1/token"))[0] == 401

            # a bystander stream through the same agent, open all along
            br, bw = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
            bw.write(b"before")
            assert await asyncio.wait_for(br.readexactly(6), 5) == b"before"

            # GET a large body, POST a large streamed body
            status, hdrs, body = await call(relay, "GET", base + "/big", tok)
            assert status == 200 and len(body) == BIG
            assert hashlib.sha256(body).digest() == hashlib.sha256(blob(BIG)).digest()
            status, _, body = await call(relay, "POST", base + "/upload?x=1", tok, stream=BIG)
            assert status == 200, body
            got = orjson.loads(body)
            assert got["sha256"] == hashlib.sha256(blob(BIG)).hexdigest() and got["target"] == "/upload?x=1"
            req = next(s for s in seen if s["method"] == "POST")
            names = [k for k, _ in req["headers"]]
            assert "authorization" not in names
            h = dict(req["headers"])
            assert (h["x-relayd-user"], h["x-relayd-role"], h["x-forwarded-for"]) == ("owner", "owner", "127.0.0.1")
            # the bare proxy path is the service's root; a client's X-Relayd-* never passes
            status, _, body = await call(relay, "GET", base, tok, headers={"X-Relayd-Role": "admin"})
            assert status == 200 and orjson.loads(body)["target"] == "/"
            assert dict(seen[-1]["headers"])["x-relayd-role"] == "owner"

            # a WebSocket echo through the proxy (the websockets library as the client)
            ctx = ssl.create_default_context(cafile=str(relay.ca_path))
            async with websockets.connect(f"wss://127.0.0.1:{relay.https_port}{base}/ws", ssl=ctx,
                                          additional_headers={"Authorization": f"Bearer {tok}"},
                                          open_timeout=5) as ws:
                for msg in ("hello", "x" * 5000):
                    await ws.send(msg)
                    assert await asyncio.wait_for(ws.recv(), 5) == msg

            # roles per method: a viewer reads but may not POST; an operator may
            vt = await token_for(relay, "viewer")
            assert (await call(relay, "GET", base + "/r", vt))[0] == 200
            assert (await call(relay, "HEAD", base + "/r", vt))[0] == 200
            before = result("role")
            status, _, body = await call(relay, "POST", base + "/w", vt, b"data")
            assert status == 403 and error_of(body) == "forbidden" and result("role") == before + 1
            ot = await token_for(relay, "operator")
            assert (await call(relay, "DELETE", base + "/w", ot))[0] == 200
            # a revoked share stops working at once, with the same token
            share(relay, did, "operator", None)
            before = result("no_role")
            status, _, body = await call(relay, "DELETE", base + "/w", ot)
            assert status == 403 and result("no_role") == before + 1
            # a token of a share turned weaker: the weaker role applies
            share(relay, did, "viewer", "operator")
            assert (await call(relay, "POST", base + "/w", vt, b"x"))[0] == 403
            # a user the token does not list the device for
            st = await token_for(relay, "stranger")
            status, _, body = await call(relay, "GET", base + "/r", st)
            assert status == 403 and result("not_in_token") >= 1
            # unknown device: 404
            status, _, body = await call(relay, "GET", "/api/v1/devices/nodevice/proxy/x", tok)
            assert status == 404 and error_of(body) == "not_found"
            # the service too slow: 504, as JSON
            before = result("timeout")
            status, _, body = await call(relay, "GET", base + "/slow", tok)
            assert status == 504 and error_of(body) == "gateway_timeout" and result("timeout") == before + 1

            # a device whose service is down: 502; then offline: 503
            dead = await start_device(tmp_path, relay, "d2", {"device": ("127.0.0.1", closed_port())})
            d2 = dead.identity["agent_id"]
            set_owner(relay, d2, "owner")
            tok2 = await token_for(relay, "owner")
            before = result("bad_gateway")
            status, _, body = await call(relay, "GET", f"/api/v1/devices/{d2}/proxy/x", tok2)
            assert status == 502 and error_of(body) == "bad_gateway" and result("bad_gateway") == before + 1
            await dead.stop()
            for _ in range(50):
                if relay.registry.get(d2) is None:
                    break
                await asyncio.sleep(0.1)
            before = result("offline")
            status, _, body = await call(relay, "GET", f"/api/v1/devices/{d2}/proxy/x", tok2)
            assert status == 503 and error_of(body) == "device_offline" and result("offline") == before + 1

            bw.write(b"after")
            assert await asyncio.wait_for(br.readexactly(5), 5) == b"after"
            bw.close()
            await dev.stop()
        svc.close()
        await relay.stop()
        return tok, vt, ot

    tokens = run(main())
    text = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    assert "device proxy request refused" in text
    for t in tokens:
        assert t not in text and t.split(".")[2] not in text


def closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_hostile_tokens_and_paths(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        relay = await relay_with_https(tmp_path)
        seen: list = []
        svc = await device_service(seen)
        async with echo_service() as echo:
            dev, did, port = await owned_device(tmp_path, relay, svc, echo)
            other = await start_device(tmp_path, relay, "d2", {"device": ("127.0.0.1", port)})
            d2 = other.identity["agent_id"]
            base = f"/api/v1/devices/{did}/proxy"
            good = await token_for(relay, "owner")
            assert (await call(relay, "GET", base + "/ok", good))[0] == 200
            br, bw = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])

            tokens = relay.device_proxy.tokens
            now = int(time.time())
            claims = {"iss": f"https://{relay.wss_address}", "aud": "relayd-device-proxy", "sub": "owner",
                      "iat": now, "nbf": now, "exp": now + 300, "jti": "j", "devs": {did: "owner"}}
            forger = Ed25519PrivateKey.generate()
            forged = jws.sign(claims, jws.PROXY, forger)  # another key
            h, p, _ = forged.split(".")
            same_kid = f"{jws._b64(orjson.dumps({'alg': 'EdDSA', 'typ': jws.PROXY, 'kid': tokens.kid}))}.{p}." \
                       + forged.split(".")[2]
            expired = jws.sign({**claims, "iat": now - 900, "nbf": now - 900, "exp": now - 600}, jws.PROXY,
                               tokens.key)
            audience = jws.sign({**claims, "aud": "relayd-device-gateway"}, jws.PROXY, tokens.key)
            issuer = jws.sign({**claims, "iss": "https://evil.example"}, jws.PROXY, tokens.key)
            device_token = relay.device_links.tokens.issue(did)[0]
            alg_none = (jws._b64(b'{"alg":"none","typ":"relayd-proxy+jwt","kid":"' + tokens.kid.encode() + b'"}')
                        + "." + jws._b64(orjson.dumps(claims)) + ".")
            hs256 = jwt.encode(claims, "secret", algorithm="HS256", headers={"kid": tokens.kid, "typ": jws.PROXY})
            # (name, token, path, method, status, metric result)
            cases = [
                ("no token", None, base + "/x", "GET", 401, "no_token"),
                ("not bearer", "Basic", base + "/x", "GET", 401, "malformed"),
                ("garbage", "a.b", base + "/x", "GET", 401, "token_malformed"),
                ("forged", forged, base + "/x", "GET", 401, "token_kid"),
                ("forged kid", same_kid, base + "/x", "GET", 401, "token_signature"),
                ("expired", expired, base + "/x", "GET", 401, "token_expired"),
                ("other audience", audience, base + "/x", "GET", 401, "token_audience"),
                ("other issuer", issuer, base + "/x", "GET", 401, "token_issuer"),
                ("device token", device_token, base + "/x", "GET", 401, "token_typ"),
                ("alg none", alg_none, base + "/x", "GET", 401, "token_alg"),
                ("HS256", hs256, base + "/x", "GET", 401, "token_alg"),
                ("traversal to another device", good, base + "/../../" + d2 + "/proxy/x", "GET", 403,
                 "not_in_token"),
                ("encoded traversal", good, base + "/%2e%2e/%2e%2e/" + d2 + "/proxy/x", "GET", 403, "not_in_token"),
            ]
            for name, tok, path, method, status, res in cases:
                before = result(res)
                st, hdrs, body = await call(relay, method, path, **({"token": tok} if tok not in (None, "Basic")
                                                                    else {}),
                                            headers={"Authorization": "Basic dXNlcjpwdw=="} if tok == "Basic"
                                            else None)
                assert st == status, (name, st, body)
                assert error_of(body) == ("unauthorized" if status == 401 else "forbidden"), name
                if status == 401:
                    assert "invalid_token" in hdrs["www-authenticate"], name
                assert result(res) == before + 1, (name, res)
                bw.write(name.encode())
                assert await asyncio.wait_for(br.readexactly(len(name)), 5) == name.encode()
            # paths the ingress refuses before any routing: encoded slash, climbing above the root
            for path in (base + "/a%2F..%2F..%2Fx", base + "/..%5c..%5cx", "/api/v1/devices/" + did + "%2Fproxy/x",
                         base + "/../../../../../../etc/passwd"):
                before = value("relayd_bad_input_total", where="https", kind="bad_request")
                st, _, body = await call(relay, "GET", path, good)
                if st == 400:
                    assert value("relayd_bad_input_total", where="https", kind="bad_request") == before + 1, path
                else:  # climbed out of the proxy's prefix: the API, where a proxy token is no admin key
                    assert st in (401, 404), (path, st, body)
            # nothing hostile reached the service
            assert all(s["target"] == "/ok" for s in seen)
            bw.write(b"end")
            assert await asyncio.wait_for(br.readexactly(3), 5) == b"end"
            bw.close()
            await dev.stop()
            await other.stop()
        svc.close()
        await relay.stop()
        return [good, forged, expired, audience, device_token, hs256]

    tokens = run(main())
    text = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    assert "device proxy request refused" in text
    for t in tokens:
        assert t.split(".")[2] not in text and t not in text


def test_token_rules():
    key = Ed25519PrivateKey.generate()
    tokens = deviceproxy.ProxyTokens(key, lambda: "https://relay.test")
    tok = tokens.issue("u1", {"d1": "viewer"})
    assert tokens.verify(tok) == ("u1", {"d1": "viewer"})
    assert tokens.jwks()["keys"][0]["kty"] == "OKP"
    assert deviceproxy.may("viewer", b"GET") and deviceproxy.may("viewer", b"HEAD")
    assert not deviceproxy.may("viewer", b"POST") and not deviceproxy.may("viewer", b"OPTIONS")
    assert all(deviceproxy.may(r, b"DELETE") for r in ("operator", "admin", "owner"))
    assert not deviceproxy.may("nobody", b"GET")
    assert deviceproxy.weaker("owner", "viewer") == "viewer"
    try:
        tokens.verify(tok, now=time.time() + 400)
    except jws.TokenError as exc:
        assert exc.reason == "expired"
    else:
        raise AssertionError("an expired token passed")
    assert os.environ.get("RELAYD_NO_EXTENSIONS") in (None, "", "0", "1")
