"""The device cloud's whole seed flow (issue 13, "Done when"; NVIDIA's
reference cloud, ../shared/specs/device-cloud.md section 4) with real
processes and real clients only: a `relayd serve` process on a real
redis-server, the real OpenID Connect provider (tests/interop/oidc), a
`relayd agent` process as the device, curl, openssl and strongSwan's pki.

1. The admin gets OTPs with curl (NVIDIA's PROV-ADMIN path, and the JSON
   route).
2. A device enrolls over EST as a `relayd agent --otp --est --pin` process
   serving a local HTTP service; two more enroll with strongSwan's pki and
   with curl + openssl (enrollment only).
3. Its tunnel comes up: device.connected on the Redis channel, the claim
   code in the agent's data directory (0600).
4. A user signed in at the provider claims it with that code (the file goes
   away), calls its service through the proxy (bodies checked by SHA-256),
   shares it with a second user as viewer (GET yes, POST 403), revokes the
   share (the viewer's same token refused at once).
5. A webhook of that user gets the device's notification (posted through
   the agent's local forwarder with curl) as a CloudEvent whose signature
   the standardwebhooks library verifies.
6. Hostile steps while a bystander stream through the device's tunnel goes
   on: a reused OTP, a wrong OTP, a wrong admin key, a bad CSR, a wrong claim
   code, a forged proxy token, a tampered ID token: each refused with a
   clear error (JSON for the REST API; EST answers RFC 7030's text, one
   401 for every bad OTP) and one increment of its metric, read from the
   relay's /metrics.
7. SIGTERM stops the agent at once (its control streams hold no drain) and
   device.disconnected shows on Redis.

No secret (OTP, token, claim code, webhook secret, admin key) reaches a log
line of the relay or the agent. Every process is started here on loopback
and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import signal
import stat
import time

import jwt
import orjson
import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relayd import _build
from relayd.control.events import DEVICE_CONNECTED, DEVICE_DISCONNECTED
from relayd.net import run
from tests.gateway.devices import http_request
from tests.gateway.test_deviceproxy import device_service
from tests.gateway.test_deviceusers_oidc import id_token
from tests.gateway.test_est import (EST, bystander, curl, device_of, issued, openssl_csr, pki_est, pki_request,
                                    sh)
from tests.gateway.test_webhooks import Receiver
from tests.tunnel.processes import Proc, free_port, wait_port
from tests.tunnel.util import echo_service
from tests.waiting import until, until_checked
from tests.gateway import test_redisbus
from tests.zerotrust import test_oidc

pytestmark = pytest.mark.interop
provider_fixture = test_oidc.idp  # the real provider, one per module
redis_server = test_redisbus.redis_url  # a redis-server of this test's own

API = "/api/v1"
STEP = 30  # seconds: the bound of any one step
BODY = 2 * 1024 * 1024 + 17  # bytes posted through the proxy


class Relay:
    """`relayd serve` with its HTTPS port, metrics, a TCP endpoint (the
    bystander's), the Redis bus and the provider (curl's view: ``https_port``
    and ``ca_path``, as tests.gateway.test_est.curl wants them)."""

    def __init__(self, tmp, redis: str, idp) -> None:
        self.data = tmp / "relay"
        self.https_port, self.metrics_port, self.echo_port = free_port(), free_port(), free_port()
        self.base = f"https://127.0.0.1:{self.https_port}"
        prov = idp.provider()
        conf = tmp / "relay.toml"
        conf.write_text("[zerotrust.providers.corp]\n" + "".join(
            f"{k} = {orjson.dumps(v).decode()}\n" for k, v in (
                ("issuer", prov.issuer), ("client_id", prov.client_id), ("client_secret", prov.client_secret),
                ("scopes", prov.scopes), ("username_claim", prov.username_claim))))
        self.proc = Proc(["serve", "--config", str(conf), "--data", str(self.data),
                          "--agents", f"127.0.0.1:{free_port()}", "--https", f"127.0.0.1:{self.https_port}",
                          "--metrics", f"127.0.0.1:{self.metrics_port}", "--tcp", f"echo=127.0.0.1:{self.echo_port}",
                          "--hostname", "relay.example", "--redis", redis])
        try:
            wait_port(self.https_port, STEP)
            wait_port(self.metrics_port, STEP)
        except AssertionError:
            print(self.proc.stop()[1][-3000:])
            raise
        self.ca_path = self.data / "ca" / "ca.crt"
        self.key = (self.data / "admin-api.key").read_text().strip()

    async def metrics(self) -> dict:
        """What a Prometheus scrape of the relay sees: (name, labels) -> value."""
        status, _, body = await http_request("127.0.0.1", self.metrics_port, "GET", "/metrics", b"",
                                             {"Host": "127.0.0.1", "Connection": "close"})
        assert status == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body.decode()) for s in fam.samples}

    async def counted(self, step, name: str, **labels) -> tuple:
        """Run ``step`` (a coroutine); the metric sample ``name{labels}``
        must grow by exactly one meanwhile. Returns what ``step`` did."""
        key = (name, tuple(sorted(labels.items())))
        before = (await self.metrics()).get(key, 0.0)
        got = await step
        after = (await self.metrics()).get(key, 0.0)
        assert after == before + 1, (name, labels, before, after)
        return got


async def api(relay: Relay, method: str, path: str, token: str | None = None, doc=None) -> tuple[int, dict | None]:
    """One call of the REST API with curl: (status, JSON body)."""
    args = ["-X", method]
    if token is not None:
        args += ["-H", f"Authorization: Bearer {token}"]
    if doc is not None:
        args += ["-H", "Content-Type: application/json", "--data", orjson.dumps(doc).decode()]
    status, headers, body = await curl(relay, API + path, *args)
    if not body.strip():
        return status, None
    assert headers["content-type"].startswith("application/json"), (path, status, headers, body[:200])
    return status, orjson.loads(body)


def refusal(status: int, doc: dict | None, want_status: int, want_error: str) -> None:
    """A refusal of the REST API: the status and one clear JSON error."""
    assert status == want_status, (status, doc)
    assert set(doc) == {"error", "message"} and doc["error"] == want_error and doc["message"], doc


async def proxy(relay: Relay, did: str, method: str, path: str, token: str, *args: str):
    """A call of the device's service through the proxy, with curl."""
    return await curl(relay, f"{API}/devices/{did}/proxy{path}", "-X", method,
                      "-H", f"Authorization: Bearer {token}", *args)


async def sign_in(idp, username: str) -> str:
    """An ID token of the provider's user, got as a client of it gets one."""
    return await asyncio.wait_for(asyncio.to_thread(id_token, idp, username), STEP)


def forged_proxy_token(token: str) -> str:
    """The same header and claims (every device as owner), signed by a key
    that is not the relay's: made with PyJWT, an independent JWS library."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["devs"] = {d: "owner" for d in claims["devs"]}
    return jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                      headers={"kid": header["kid"], "typ": header["typ"]})


def tampered(token: str, **claims) -> str:
    """A provider's ID token with claims changed and its signature kept."""
    head, body, sig = token.split(".")
    doc = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    body = base64.urlsafe_b64encode(orjson.dumps({**doc, **claims})).rstrip(b"=").decode()
    return f"{head}.{body}.{sig}"


async def absent(redis, key: str) -> bool:
    return not await redis.exists(key)


class Events:
    """The Redis channel relayd:events, as another node would read it."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, []

    async def start(self) -> "Events":
        self.redis = aioredis.Redis.from_url(self.url)
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe("relayd:events")
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] == "message":
                self.seen.append(orjson.loads(msg["data"])["event"])

    def of(self, kind: str, device: str) -> list[dict]:
        return [e for e in self.seen if e["type"] == kind and e["subject"] == device]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.pubsub.aclose()
        await self.redis.aclose()


def test_the_seed_flow_with_real_clients_and_servers(tmp_path, redis_server, provider_fixture):
    missing = [tool for tool in ("curl", "openssl", "pki") if shutil.which(tool) is None]
    if missing:  # the flow is the proof: never skipped
        pytest.fail(f"{', '.join(missing)} missing: run the test command (scripts/test.sh), which installs them")
    url, _ = redis_server
    idp = provider_fixture
    alice, bob = sorted(idp.accounts)[:2]
    relay = Relay(tmp_path, url, idp)
    agent = None
    secrets_seen: list[str] = [relay.key]
    started = time.monotonic()

    async def main():
        nonlocal agent
        events = await Events(url).start()
        seen_by_service: list = []
        service = await device_service(seen_by_service)
        receiver = await Receiver().start()
        try:
            async with echo_service() as echo:
                await flow(events, service.sockets[0].getsockname()[1], echo, seen_by_service, receiver)
        finally:
            receiver.close()
            service.close()
            await events.close()

    async def flow(events: Events, svc: int, echo: int, seen_by_service: list, receiver: Receiver):
        nonlocal agent
        # -- 1. the admin's OTPs, with curl: NVIDIA's path (the bare code; JSON on Accept) and the JSON route
        prov_admin = ["-H", f"Authorization: PROV-ADMIN {relay.key}"]
        status, h, bare = await curl(relay, "/admin/api/otp", *prov_admin)
        assert status == 200 and h["content-type"].startswith("text/plain") and len(bare) == 26, bare
        otp_curl = bare.decode()
        status, _, body = await curl(relay, "/admin/api/otp", *prov_admin, "-H", "Accept: application/json")
        assert status == 200
        otp_agent = orjson.loads(body)
        status, _, body = await curl(relay, API + "/admin/otps", "-X", "POST", *prov_admin,
                                     "-H", "Content-Type: application/json", "--data", '{"device_name": "pki-cam"}')
        assert status == 201, body
        otp_pki = orjson.loads(body)["otp"]
        secrets_seen.extend([otp_curl, otp_agent["otp"], otp_pki])

        # -- 2. the device: a relayd agent process enrolled over EST, its service and an echo behind it
        dev_data = tmp_path / "device"
        devapi = free_port()
        agent = Proc(["agent", "--data", str(dev_data), "--otp", otp_agent["otp"], "--est", relay.base,
                      "--pin", otp_agent["ca_sha256"], "--endpoint", f"device=127.0.0.1:{svc}",
                      "--endpoint", f"echo=127.0.0.1:{echo}", "--device-api", f"127.0.0.1:{devapi}"])
        ident = await until(lambda: orjson.loads((dev_data / "identity.json").read_bytes()), STEP,
                            "the device did not enroll", ignore=(OSError, orjson.JSONDecodeError))
        did = ident["agent_id"]
        # two more devices, enrollment only: strongSwan's pki, and curl + openssl
        _, req = await pki_request(tmp_path, "pki-cam")
        rc, out, err = await pki_est(relay.base, str(relay.ca_path), req, "--userpass", f"cam:{otp_pki}")
        assert rc == 0, (out, err)
        pki_device = device_of(x509.load_pem_x509_certificate(out))
        csr = await openssl_csr(tmp_path, "curl-cam")
        status, _, body = await curl(relay, EST + "/simpleenroll", "-u", f"cam:{otp_curl}",
                                     "-H", "Content-Type: application/pkcs10", "--data-binary", f"@{csr}")
        assert status == 200, body
        curl_device = device_of(issued(body))
        assert len({did, pki_device, curl_device}) == 3

        # -- 3. the tunnel is up: device.connected on Redis; the claim code reaches the device
        ev = (await until(lambda: events.of(DEVICE_CONNECTED, did), STEP, "no device.connected on Redis"))[0]
        assert ev["data"]["device_id"] == did and ev["data"]["node"] and ev["data"]["remote_addr"]
        code_file = dev_data / "claim_code"
        await until(code_file.exists, STEP, "no claim code")
        assert stat.S_IMODE(code_file.stat().st_mode) == 0o600
        code = code_file.read_text().strip()
        secrets_seen.append(code)
        presence = f"relayd:device:{did}"
        doc = orjson.loads(await until_checked(lambda: events.redis.get(presence), STEP, "no presence key"))
        assert doc["node"] == ev["data"]["node"]

        # -- 4. a user of the provider claims it, calls its service, shares it, revokes the share
        token = await sign_in(idp, alice)
        secrets_seen.append(token)
        status, me = await api(relay, "GET", "/users/me", token)
        assert status == 200 and me["iss"] == idp.issuer, me
        status, doc = await api(relay, "POST", "/devices/claim", token, {"claim_code": code.lower()})
        assert (status, doc) == (200, {"device_id": did, "role": "owner"})
        await until(lambda: not code_file.exists(), STEP, "the agent kept the claim code")
        status, doc = await api(relay, "GET", "/devices", token)
        assert [(d["id"], d["state"], d["role"]) for d in doc["items"]] == [(did, "online", "owner")]
        status, doc = await api(relay, "POST", "/token", token, {"device_id": did})
        assert status == 200 and doc["token_type"] == "Bearer", doc
        proxy_token = doc["token"]
        secrets_seen.append(proxy_token)
        status, _, body = await proxy(relay, did, "GET", "/status?x=1", proxy_token)
        assert status == 200 and orjson.loads(body)["target"] == "/status?x=1", body
        got = dict(seen_by_service[-1]["headers"])
        assert got["x-relayd-user"] == me["id"] and got["x-relayd-role"] == "owner" and "authorization" not in got
        payload = os.urandom(BODY)
        (tmp_path / "payload").write_bytes(payload)
        status, _, body = await proxy(relay, did, "POST", "/upload", proxy_token, "--data-binary",
                                      f"@{tmp_path / 'payload'}", "-H", "Content-Type: application/octet-stream")
        assert status == 200 and orjson.loads(body)["sha256"] == hashlib.sha256(payload).hexdigest()
        # share with a second user of the provider as viewer: GET yes, POST no
        token_b = await sign_in(idp, bob)
        secrets_seen.append(token_b)
        status, me_b = await api(relay, "GET", "/users/me", token_b)
        assert status == 200
        assert (await api(relay, "GET", f"/devices/{did}", token_b))[0] == 404  # not shared yet
        status, doc = await api(relay, "PUT", f"/devices/{did}/users/{me_b['id']}", token, {"role": "viewer"})
        assert status == 200, doc
        status, doc = await api(relay, "POST", "/token", token_b, {"device_id": did})
        assert status == 200, doc
        viewer_token = doc["token"]
        secrets_seen.append(viewer_token)
        status, _, body = await proxy(relay, did, "GET", "/status", viewer_token)
        assert status == 200, body
        assert dict(seen_by_service[-1]["headers"])["x-relayd-role"] == "viewer"
        status, _, body = await relay.counted(proxy(relay, did, "POST", "/upload", viewer_token, "--data", "x"),
                                              "relayd_device_proxy_requests_total", result="role")
        refusal(status, orjson.loads(body), 403, "forbidden")
        assert (await api(relay, "DELETE", f"/devices/{did}/users/{me_b['id']}", token))[0] == 204
        status, _, body = await relay.counted(proxy(relay, did, "GET", "/status", viewer_token),
                                              "relayd_device_proxy_requests_total", result="no_role")
        refusal(status, orjson.loads(body), 403, "forbidden")  # the same token, at once

        # -- 5. a webhook gets the device's notification, signed
        status, hook = await api(relay, "POST", "/webhooks", token, {
            "url": f"http://127.0.0.1:{receiver.port}/hook", "events": ["device.notification"]})
        assert status == 201 and hook["secret"].startswith("whsec_"), hook
        secrets_seen.append(hook["secret"])
        note = {"type": "motion", "severity": "warning", "title": "Door", "message": "moved", "data": {"zone": 3}}

        async def notify():
            rc, out, err = await sh("curl", "-sS", "--max-time", "15", "-o", "/dev/null", "-w", "%{http_code}",
                                    "-X", "POST", f"http://127.0.0.1:{devapi}{API}/device/notifications",
                                    "-H", "Content-Type: application/json", "--data", orjson.dumps(note).decode())
            assert rc == 0, err
            return out == b"202"

        # (503 until the agent holds its device token, pushed at connect)
        await until_checked(notify, STEP, "the local forwarder never took the notification")
        _, headers, raw, _ = (await until(lambda: receiver.delivered, STEP, "no webhook delivery"))[0]
        ce = Webhook(hook["secret"]).verify(raw, headers)
        assert ce["specversion"] == "1.0" and ce["type"] == "dev.relayd.device.notification"
        assert ce["source"] == f"relayd://devices/{did}" and ce["subject"] == did
        assert {k: ce["data"][k] for k in note} == note
        with pytest.raises(WebhookVerificationError):  # (the check does check)
            Webhook(hook["secret"]).verify(raw.replace(b"moved", b"MOVED"), headers)

        # -- 6. hostile steps, each refused and counted, beside a bystander stream through the device's tunnel
        done = asyncio.Event()
        keep = asyncio.ensure_future(bystander(relay.echo_port, 0, done))
        try:
            await hostile(did, token, proxy_token, otp_agent["otp"], csr)
        finally:
            done.set()
        assert await keep, "the bystander stream was disturbed"
        status, _, body = await proxy(relay, did, "GET", "/status", proxy_token)
        assert status == 200, body  # the real token still works

        # -- 7. SIGTERM: the agent stops at once; device.disconnected on Redis
        t0 = time.monotonic()
        os.kill(agent.p.pid, signal.SIGTERM)
        await until(lambda: agent.p.poll() is not None, 5, "the agent did not stop on SIGTERM")
        assert agent.p.returncode == 0 and time.monotonic() - t0 < 3, (agent.p.returncode, time.monotonic() - t0)
        ev = (await until(lambda: events.of(DEVICE_DISCONNECTED, did), STEP, "no device.disconnected"))[0]
        assert ev["data"]["device_id"] == did and ev["data"]["reason"]
        await until_checked(lambda: absent(events.redis, presence), STEP, "the presence key stayed")

    async def hostile(did: str, token: str, proxy_token: str, spent_otp: str, csr: str):
        est = ["-H", "Content-Type: application/pkcs10", "--data-binary", f"@{csr}"]
        answers = []
        for otp in (spent_otp, "0" * 26):  # a reused OTP, a wrong one: the same 401
            status, h, body = await relay.counted(curl(relay, EST + "/simpleenroll", "-u", f"cam:{otp}", *est),
                                                  "relayd_bad_input_total", where="est", kind="bad_otp")
            assert status == 401 and h["www-authenticate"] == 'Basic realm="relayd-est"' and body.strip()
            answers.append(body)
        assert answers[0] == answers[1]
        status, _, body = await relay.counted(curl(relay, "/admin/api/otp", "-H", "Authorization: PROV-ADMIN wrong"),
                                              "relayd_bad_input_total", where="provisioning", kind="bad_key")
        refusal(status, orjson.loads(body), 401, "unauthorized")
        status, doc = await api(relay, "POST", "/admin/otps", relay.key, {})
        assert status == 201
        secrets_seen.append(doc["otp"])
        (tmp_path / "bad.csr").write_bytes(base64.b64encode(os.urandom(300)))  # base64, but of no CSR
        status, _, body = await relay.counted(
            curl(relay, EST + "/simpleenroll", "-u", f"cam:{doc['otp']}", "-H", "Content-Type: application/pkcs10",
                 "--data-binary", f"@{tmp_path / 'bad.csr'}"),
            "relayd_bad_input_total", where="est", kind="bad_csr")
        assert status == 400 and b"PKCS#10" in body, body
        status, doc = await relay.counted(api(relay, "POST", "/devices/claim", token,
                                              {"claim_code": "0000-0000-0000-0000"}),
                                          "relayd_device_claims_total", result="unknown_code")
        refusal(status, doc, 404, "unknown_code")
        status, _, body = await relay.counted(proxy(relay, did, "GET", "/status", forged_proxy_token(proxy_token)),
                                              "relayd_device_proxy_requests_total", result="token_signature")
        refusal(status, orjson.loads(body), 401, "unauthorized")
        status, doc = await relay.counted(api(relay, "GET", "/devices", tampered(token, sub="someone-else")),
                                          "relayd_user_auth_refusals_total", reason="signature")
        refusal(status, doc, 401, "unauthorized")

    try:
        run(main())
    finally:
        logs = ""
        for p in (agent, relay.proc):
            if p is not None:
                out, err = p.stop()
                logs += out + err
    assert "Traceback" not in logs, logs[-3000:]
    # the processes ran this test run's build (compiled, or the pure twins: scripts/test.sh runs both)
    for what in ("starting relay", "starting agent"):
        line = next(orjson.loads(x) for x in logs.splitlines() if f'"msg":"{what}"' in x)
        assert {k: line[k] for k in _build.report()} == _build.report(), line
    for secret in secrets_seen:
        assert secret not in logs, "a secret reached a log line"
    print(f"seed flow in {time.monotonic() - started:.1f} s")
