"""Webhooks (issue 13 item 6, spec 7.7): a user registers a webhook, a
device posts a notification, and a real receiver on loopback gets a
CloudEvents 1.0 document whose Standard Webhooks signature an independent
library (standardwebhooks, PyPI) verifies; failed deliveries (5xx, a
timeout, a refused connection) are retried with the same webhook-id; users
get no events of devices they cannot see."""

import asyncio
import socket
import time

import orjson
from standardwebhooks.webhooks import Webhook

from relayd.control.api import ApiError
from relayd.control.webhooks import check_url
from relayd.errors import ConfigError
from relayd.net import run
from tests.gateway.devices import https, local, note, relay_with_https, start_device
from tests.metric import value
from tests.tunnel.util import echo_ok, echo_service
from tests.waiting import until

JSON = {"Content-Type": "application/json"}


class Receiver:
    """An HTTP receiver on loopback. ``script`` says how to answer the next
    requests (``500``, ``hang``; then 204 for the rest)."""

    def __init__(self, port: int = 0, script=()) -> None:
        self.port, self.script, self.got = port, list(script), []
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def close(self):
        self.server.close()

    async def _serve(self, r, w):
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            body = await asyncio.wait_for(r.readexactly(int(headers.get("content-length", 0))), 5)
            action = self.script.pop(0) if self.script else 204
            self.got.append((lines[0], headers, body, action))
            if action == "hang":
                await asyncio.sleep(3)
                return
            w.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % action)
            await w.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            w.close()

    @property
    def delivered(self):
        return [g for g in self.got if g[3] == 204]


def users(relay, *ids):
    with relay.store.transaction() as db:
        for u in ids:
            db.execute("INSERT INTO dc_users(id, iss, sub, created_at) VALUES (?, 'test', ?, ?)", (u, u, time.time()))


def fake_user_auth(head, cred):
    """Stands in for the user sign-in function (tokens "user-<id>")."""
    v = (head.get(b"authorization") or b"").decode()
    if not v.startswith("Bearer user-"):
        raise ApiError(401, "unauthorized", "no user")
    return v[len("Bearer user-"):]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_signed_cloudevents_retries_and_visibility(tmp_path):
    async def main():
        relay = await relay_with_https(tmp_path)
        relay.webhooks.user_auth = fake_user_auth
        relay.notifier.limits.first_retry = 0.1
        relay.notifier.senders["webhook"].timeout = 0.5
        users(relay, "u1", "u2")

        async def api(method, path, user, doc=None):
            status, _, body = await https(relay, method, "/api/v1" + path, orjson.dumps(doc) if doc else b"",
                                          {**JSON, "Authorization": f"Bearer user-{user}"} if user else JSON)
            return status, (orjson.loads(body) if body else None)

        async with echo_service() as svc:
            dev = await start_device(tmp_path, relay, "d1", {"echo": ("127.0.0.1", svc)},
                                     device_api=("127.0.0.1", 0))
            did = dev.identity["agent_id"]
            with relay.store.transaction() as db:
                db.execute("UPDATE dc_devices SET owner = 'u1' WHERE id = ?", (did,))
            await until(lambda: dev.device_token, 5)
            # u1's receiver fails twice (500, then no answer in time) before it takes the event
            r1 = await Receiver(script=[500, "hang"]).start()
            r2 = await Receiver().start()
            refused_port = free_port()
            st, h1 = await api("POST", "/webhooks", "u1", {"url": f"http://127.0.0.1:{r1.port}/hook",
                                                           "events": ["device.notification"]})
            assert st == 201 and h1["secret"].startswith("whsec_") and h1["device_ids"] is None
            st, h3 = await api("POST", "/webhooks", "u1", {"url": f"http://127.0.0.1:{refused_port}/",
                                                           "device_ids": [did]})
            assert st == 201
            st, h2 = await api("POST", "/webhooks", "u2", {"url": f"http://localhost:{r2.port}/u2"})
            assert st == 201
            # u2 cannot name u1's device; nobody without a user token gets in
            st, err = await api("POST", "/webhooks", "u2", {"url": "https://example.com/", "device_ids": [did]})
            assert st == 422 and err["error"] == "invalid"
            assert (await api("POST", "/webhooks", None, {"url": "https://example.com/"}))[0] == 401
            st, listed = await api("GET", "/webhooks", "u1")
            listed = listed["items"]
            assert st == 200 and {h["id"] for h in listed} == {h1["id"], h3["id"]}
            assert all("secret" not in h for h in listed)
            assert (await api("GET", f"/webhooks/{h1['id']}", "u2"))[0] == 404
            assert (await api("DELETE", f"/webhooks/{h1['id']}", "u2"))[0] == 404

            failed = value("relayd_webhook_deliveries_total", result="failed")
            st, _, body = await local(dev, "POST", "/api/v1/device/notifications", note(data={"n": 1}), JSON)
            assert st == 202
            eid = orjson.loads(body)["id"]
            await until(lambda: r1.delivered, 10, "u1's receiver never got the event")
            assert [g[3] for g in r1.got] == [500, "hang", 204]
            # every attempt: the same webhook-id, each signature good (standardwebhooks verifies)
            for line, headers, raw, _ in r1.got:
                assert line == "POST /hook HTTP/1.1" and headers["webhook-id"] == eid
                assert headers["content-type"] == "application/cloudevents+json"
                ce = Webhook(h1["secret"]).verify(raw, headers)
                assert ce["specversion"] == "1.0" and ce["id"] == eid
                assert ce["source"] == f"relayd://devices/{did}" and ce["type"] == "dev.relayd.device.notification"
                assert ce["time"].endswith("Z") and ce["data"]["data"] == {"n": 1}
                assert ce["data"]["severity"] == "warning"
            # a tampered body, another secret: refused by the library
            _, headers, raw, _ = r1.delivered[0]
            for bad in ((h1["secret"], raw.replace(b"warning", b"critical")), (h2["secret"], raw)):
                try:
                    Webhook(bad[0]).verify(bad[1], headers)
                except Exception:
                    pass
                else:
                    raise AssertionError("a bad signature verified")
            # the refused connection: retried until a receiver listens there
            await until(lambda: value("relayd_webhook_deliveries_total", result="failed") >= failed + 4, 10)
            r3 = await Receiver(port=refused_port).start()
            await until(lambda: r3.delivered, 10, "no retry after the connection was refused")
            assert Webhook(h3["secret"]).verify(r3.delivered[0][2], r3.delivered[0][1])["id"] == eid
            # u2 sees nothing of d1 ... until u1 shares it
            assert r2.got == []
            with relay.store.transaction() as db:
                db.execute("INSERT INTO dc_shares VALUES (?, 'u2', 'viewer', ?)", (did, time.time()))
            st, _, body = await local(dev, "POST", "/api/v1/device/notifications", note(), JSON)
            await until(lambda: r2.delivered, 10, "no delivery after the share")
            assert Webhook(h2["secret"]).verify(r2.delivered[0][2], r2.delivered[0][1])["id"] == orjson.loads(body)["id"]
            # a deleted webhook gets no more
            assert (await api("DELETE", f"/webhooks/{h1['id']}", "u1"))[0] == 204
            n = len(r1.got)
            await local(dev, "POST", "/api/v1/device/notifications", note(), JSON)
            await until(lambda: len(r2.delivered) == 2, 10)
            assert len(r1.got) == n
            assert await echo_ok(relay.tcp_ports["echo"])
            for r in (r1, r2, r3):
                r.close()
            await dev.stop()
        await relay.stop()

    run(main())


def test_a_revoked_share_stops_queued_retries(tmp_path):
    async def main():
        relay = await relay_with_https(tmp_path)
        relay.webhooks.user_auth = fake_user_auth
        relay.notifier.limits.first_retry = 0.2
        relay.notifier.limits.max_retry = 0.5  # the retry after the revocation comes soon, however many came before
        users(relay, "u1", "u2")
        async with echo_service() as svc:
            dev = await start_device(tmp_path, relay, "d1", {"echo": ("127.0.0.1", svc)})
            did = dev.identity["agent_id"]
            with relay.store.transaction() as db:
                db.execute("UPDATE dc_devices SET owner = 'u1' WHERE id = ?", (did,))
                db.execute("INSERT INTO dc_shares VALUES (?, 'u2', 'viewer', ?)", (did, time.time()))
            r = await Receiver(script=[500] * 100).start()
            st, _, _ = await https(relay, "POST", "/api/v1/webhooks", orjson.dumps({"url": f"http://127.0.0.1:{r.port}/"}),
                                   {**JSON, "Authorization": "Bearer user-u2"})
            assert st == 201
            await until(lambda: dev.device_token, 5)
            st, _, _ = await https(relay, "POST", "/api/v1/device/notifications", note(),
                                   {**JSON, "Authorization": f"Bearer {dev.device_token}"})
            assert st == 202
            await until(lambda: len(r.got) >= 2, 10)
            hidden = value("relayd_webhook_deliveries_total", result="not_visible")
            with relay.store.transaction() as db:
                db.execute("DELETE FROM dc_shares WHERE user_id = 'u2'")
            # at least one: a reconnect under load can queue the device's connection events too
            await until(lambda: value("relayd_webhook_deliveries_total", result="not_visible") >= hidden + 1, 10)
            n = len(r.got)
            await until(lambda: relay.notifier.pending == 0, 5)
            assert len(r.got) == n
            r.close()
            await dev.stop()
        await relay.stop()

    run(main())


def test_webhook_urls():
    for good in ("https://hooks.example.com/x?y=1", "http://127.0.0.1:9/", "http://[::1]:8080/h", "http://localhost/"):
        assert check_url(good) == good
    for bad in ("http://example.com/", "ftp://x/", "https://user:pw@example.com/", "https://x/#f", "https://",
                "https://x:99999/", "x" * 3000, None):
        try:
            check_url(bad)
        except ConfigError:
            pass
        else:
            raise AssertionError(bad)
