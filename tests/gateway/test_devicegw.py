"""The device gateway (issue 13 item 6): the relay pushes a device its token
when the tunnel comes up and at half-life; the device posts notifications
with that token, with its certificate, or through the agent's local
forwarder with no credential; hostile calls are refused, counted and logged
without token or payload while a bystander's stream goes on."""

import asyncio
import base64
import logging
import time

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd.control import devicegw, jws
from relayd.net import run
from tests.gateway.devices import https, local, note, relay_with_https, start_device
from tests.metric import value
from tests.tunnel.util import echo_ok, echo_service, start_agent, join_token
from tests.waiting import until

PATH = "/api/v1/device/notifications"
JSON = {"Content-Type": "application/json"}


def claims(token: str) -> dict:
    return orjson.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))


def refusals(reason: str) -> float:
    return value("relayd_device_api_refusals_total", reason=reason)


def test_token_pushed_and_notifications_by_every_way_in(tmp_path):
    async def main():
        relay = await relay_with_https(tmp_path)
        relay.device_links.tokens.ttl = 4  # a refresh every 2 s
        seen = []
        relay.bus.subscribe(seen.append)
        async with echo_service() as svc:
            dev = await start_device(tmp_path, relay, "d1", {"echo": ("127.0.0.1", svc)},
                                     device_api=("127.0.0.1", 0))
            did = dev.identity["agent_id"]
            await until(lambda: dev.device_token, 5, "no device token pushed")
            first = dev.device_token
            c = claims(first)
            assert (c["sub"], c["aud"], c["exp"] - c["iat"]) == (did, "relayd-device-gateway", 4)
            assert dev.device_token_expires.endswith("Z")
            assert relay.device_links.tokens.verify(first) == did
            await until(lambda: dev.device_token != first, 5, "no token at half-life")

            # 1. the local forwarder: no credential from the caller (one given is dropped)
            status, _, body = await local(dev, "POST", PATH, note(data={"zone": 3}),
                                          {**JSON, "Authorization": "Bearer nonsense"})
            assert status == 202, body
            eid = orjson.loads(body)["id"]
            await until(lambda: any(e.id == eid for e in seen), 5)
            ev = next(e for e in seen if e.id == eid)
            assert (ev.type, ev.subject) == ("device.notification", did)
            assert ev.data["type"] == "motion" and ev.data["severity"] == "warning" and ev.data["data"] == {"zone": 3}
            # 2. the HTTPS port with the token
            status, _, body = await https(relay, "POST", PATH, note(), {**JSON,
                                                                        "Authorization": f"Bearer {dev.device_token}"})
            assert status == 202, body
            # 3. the HTTPS port with the device's certificate
            cert = (str(tmp_path / "d1" / "agent.crt"), str(tmp_path / "d1" / "agent.key"))
            status, _, body = await https(relay, "POST", PATH, note(), JSON, cert=cert)
            assert status == 202, body
            assert len([e for e in seen if e.subject == did and e.type == "device.notification"]) == 3
            # the forwarder's other answers
            assert (await local(dev, "GET", "/api/v1/users/me"))[0] == 404
            assert (await local(dev, "POST", PATH, b"x" * (64 * 1024 + 1), JSON))[0] == 413
            big = orjson.dumps({"type": "big", "message": "m" * 4000, "data": {"blob": "b" * 60000}})
            assert len(big) <= 64 * 1024
            status, _, body = await local(dev, "POST", PATH, big, JSON)  # carried in two pieces
            assert status == 202, body
            assert await echo_ok(relay.tcp_ports["echo"])
            await dev.stop()
        await relay.stop()

    run(main())


def test_an_agent_that_is_not_a_device_gets_no_token(tmp_path):
    async def main():
        relay = await relay_with_https(tmp_path)
        async with echo_service() as svc:
            plain = await start_agent(tmp_path, "p", join_token(relay), {"echo": ("127.0.0.1", svc)},
                                      device_api=("127.0.0.1", 0))
            dev = await start_device(tmp_path, relay, "d1", {"echo": ("127.0.0.1", svc)})
            await until(lambda: dev.device_token, 5)
            assert plain.device_token is None
            status, _, body = await local(plain, "POST", PATH, note(), JSON)
            assert status == 503 and orjson.loads(body)["error"] == "unavailable"
            # its certificate is the relay CA's, but it is no device
            before = refusals("unknown_device")
            cert = (str(tmp_path / "p" / "agent.crt"), str(tmp_path / "p" / "agent.key"))
            assert (await https(relay, "POST", PATH, note(), JSON, cert=cert))[0] == 401
            assert refusals("unknown_device") == before + 1
            await plain.stop()
            await dev.stop()
        await relay.stop()

    run(main())


def test_hostile_device_calls(tmp_path, caplog):
    async def main():
        relay = await relay_with_https(tmp_path)
        async with echo_service() as svc:
            a = await start_device(tmp_path, relay, "a", {"echo": ("127.0.0.1", svc)}, device_api=("127.0.0.1", 0))
            b = await start_device(tmp_path, relay, "b", {"echo": ("127.0.0.1", svc)}, device_api=("127.0.0.1", 0))
            await until(lambda: a.device_token and b.device_token, 5)
            aid = a.identity["agent_id"]
            tokens = relay.device_links.tokens
            bystander = asyncio.ensure_future(_bystander(relay.tcp_ports["echo"]))
            secret_marker = "PAYLOAD-MARKER-7731"
            body = note(message=secret_marker)
            expired, _ = tokens.issue(aid, now=time.time() - 3600)
            other_key = devicegw.DeviceTokens(Ed25519PrivateKey.generate())
            forged, _ = other_key.issue(aid)
            wrong_aud = jws.sign({"iss": "relayd", "aud": "relayd-device-proxy", "sub": aid, "iat": int(time.time()),
                                  "nbf": int(time.time()), "exp": int(time.time()) + 60}, jws.DEVICE, tokens.key)
            cases = [  # (headers, body, status, refusal reason or None)
                (JSON, body, 401, "missing"),
                ({**JSON, "Authorization": "Basic Zm9vOmJhcg=="}, body, 401, "malformed"),
                ({**JSON, "Authorization": "Bearer not.a.token"}, body, 401, "malformed"),
                ({**JSON, "Authorization": f"Bearer {expired}"}, body, 401, "expired"),
                ({**JSON, "Authorization": f"Bearer {forged}"}, body, 401, "kid"),
                ({**JSON, "Authorization": f"Bearer {wrong_aud}"}, body, 401, "audience"),
                ({**JSON, "Authorization": f"Bearer {a.device_token[:-4]}AAAA"}, body, 401, "signature"),
                ({**JSON, "Authorization": f"Bearer {a.device_token}"}, b"x" * (64 * 1024 + 1), 413, "too_large"),
                ({**JSON, "Authorization": f"Bearer {a.device_token}"}, b"{not json", 400, None),
                ({**JSON, "Authorization": f"Bearer {a.device_token}"}, b'{"type": "x", "nope": 1}', 422, None),
                ({"Content-Type": "text/plain", "Authorization": f"Bearer {a.device_token}"}, body, 415, None),
            ]
            with caplog.at_level(logging.DEBUG):
                for headers, payload, status, reason in cases:
                    before = refusals(reason) if reason else 0
                    got, hdrs, answer = await https(relay, "POST", PATH, payload, headers)
                    assert got == status, (headers.get("Authorization", "")[:12], got, answer)
                    assert "error" in orjson.loads(answer)
                    if reason:
                        assert refusals(reason) == before + 1, reason
                    if status == 401:
                        assert "www-authenticate" in hdrs
                # another device's token through my tunnel
                before = refusals("other_device")
                b.device_token = a.device_token
                assert (await local(b, "POST", PATH, body, JSON))[0] == 401
                assert refusals("other_device") == before + 1
                # the rate: a burst, then 429 with Retry-After (the other device unaffected)
                before = refusals("rate")
                statuses = []
                for _ in range(int(devicegw.BURST) + 3):
                    s, h, _ = await https(relay, "POST", PATH, body, {**JSON, "Authorization": f"Bearer {a.device_token}"})
                    statuses.append((s, h.get("retry-after")))
                assert statuses[0][0] == 202 and statuses[-1][0] == 429 and statuses[-1][1].isdigit()
                assert refusals("rate") >= before + 1
                assert (await local(a, "POST", PATH, body, JSON))[0] == 429  # the forwarder: same device, same bucket
            texts = [r.getMessage() + repr(r.__dict__) for r in caplog.records]
            for secret in (a.device_token, expired, forged, secret_marker, a.device_token[-20:]):
                assert not any(secret in t for t in texts)
            assert any("api request refused" in t for t in texts)
            assert await bystander, "the bystander's stream broke"
            assert value("relayd_api_requests_total", route="/device/notifications", method="POST", status="401") >= 7
            await a.stop()
            await b.stop()
        await relay.stop()

    run(main())


async def _bystander(port: int) -> bool:
    """A long echo exchange through the tunnel while the attacks run."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i in range(40):
            msg = f"bystander {i}\n".encode() * 100
            w.write(msg)
            if await asyncio.wait_for(r.readexactly(len(msg)), 5) != msg:
                return False
            await asyncio.sleep(0.02)
        return True
    finally:
        w.close()


def test_device_token_checks_offline():
    tokens = devicegw.DeviceTokens(Ed25519PrivateKey.generate(), ttl=900)
    tok, exp = tokens.issue("ag-1", now=1000)
    assert exp == 1900 and tokens.verify(tok, now=1500) == "ag-1"
    for now, reason in ((1900, "expired"), (900, "not_yet_valid")):
        try:
            tokens.verify(tok, now=now)
        except jws.TokenError as exc:
            assert exc.reason == reason
        else:
            raise AssertionError(f"accepted at {now}")
    lim = devicegw.RateLimiter(rate=1, burst=2, clock=iter([0, 0, 0, 0.5, 1.0]).__next__)
    assert [lim.take("d") for _ in range(3)] == [0, 0, 1.0]
    assert lim.take("d") == 0.5 and lim.take("d") == 0




def test_the_forwarder_listens_on_loopback_only(tmp_path):
    from relayd.config import AgentConfig, load_agent
    from relayd.errors import ConfigError

    (tmp_path / "a.toml").write_text('[agent]\ndevice_api = "127.0.0.1:8089"\n')
    assert load_agent(tmp_path / "a.toml").device_api == ("127.0.0.1", 8089)
    for host in ("0.0.0.0", "192.0.2.1"):
        try:
            AgentConfig(device_api=(host, 8089)).validate()
        except ConfigError as exc:
            assert "loopback" in str(exc)
        else:
            raise AssertionError(host)
