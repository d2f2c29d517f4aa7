"""The device cloud on one relay node (issue 13, item 8), each figure against
a peer measured in the same run:

1. Devices enrolled per second over EST (``simpleenroll`` with an OTP and a
   CSR made beforehand, N at a time, a new TLS connection each, as a device
   does), against agents enrolled with join tokens (the agents port's
   ``enroll`` request, CSRs made beforehand too) on the same relay, in
   interleaved rounds; with the relay's CPU time per enrollment.
2. Idle devices per node: every device enrolled in 1 connects (the project's
   own agent, relayd.agent.AgentNode, several thousand per process in a few
   processes) to a freshly started relay and stays up; the relay's RSS
   before and after, per device, and its CPU while they idle. Peer: the
   agents enrolled with join tokens in 1, on the relay started afresh, the
   same way (what bench/scale.py measures as "KiB per idle agent").
3. Device-proxy requests: wrk through ``/api/v1/devices/{id}/proxy/`` with a
   proxy token against the relay's plain HTTP endpoint, both to one nginx
   back end behind one device agent (`relayd agent --otp --est`), same
   client and connections, runs taken in turn.
4. Event to webhook: a device's ``POST /api/v1/device/notifications``
   (over HTTPS with its device token, and through the agent's local
   forwarder) until a loopback receiver has the signed CloudEvent, against
   the same POST's own round trip (its 202).

    bash bench/devices/run.sh --quick     # 500 devices, a few minutes
    bash bench/devices/run.sh             # 10,000 devices

(run.sh installs nginx-light and wrk if missing, then runs this file with
the project's .venv.)

Every process (relay, device simulators, nginx, the device agent) runs on
loopback, started here and stopped by PID. Prints markdown tables and a JSON
summary. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.http.run import Procs, nginx_conf, wrk  # noqa: E402
from bench.scale import raise_nofile, rss, stop, wait_file  # noqa: E402
from tests.gateway.devices import http_request, note  # noqa: E402
from tests.tunnel.processes import free_port, wait_port  # noqa: E402
from tests.waiting import until_sync  # noqa: E402

PY = sys.executable
PASSWORD = "bench horse battery staple"
#: OTPs through the admin API: its burst per client (relayd.control.provisioning
#: RATE, BURST = 2/s, 60); the rest the way `relayd admin otp create` makes them.
API_OTPS = 50
#: Device simulator processes; links being set up at once, all processes
#: together, stay under the relay's 64 unauthenticated connections per source.
SIMS = 4
SIM_CONNECTING = 12
#: A device may post 5 notifications a second (a bucket of 20): the pace.
EVENT_GAP = 0.21


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


class Relay:
    """`relayd serve` over one data directory on fixed ports, so that the
    identities enrolled with one process still work with the next."""

    def __init__(self, procs: Procs, tmp: Path) -> None:
        self.procs, self.tmp = procs, tmp
        self.data = tmp / "relay"
        self.agents, self.https, self.metrics = free_port(), free_port(), free_port()
        self.base = f"https://127.0.0.1:{self.https}"
        self.p = None
        self.http = requests.Session()
        self.http.trust_env = False

    def start(self, name: str) -> None:
        self.p = self.procs.start(name, [PY, "-m", "relayd.cli", "serve", "--data", str(self.data),
                                         "--agents", f"127.0.0.1:{self.agents}", "--https", f"127.0.0.1:{self.https}",
                                         "--http", "web=127.0.0.1", "--metrics", f"127.0.0.1:{self.metrics}"],
                                  preexec_fn=raise_nofile)
        for port in (self.agents, self.https, self.metrics):
            wait_port(port, 30)
        self.ca = str(self.data / "ca" / "ca.crt")
        self.key = (self.data / "admin-api.key").read_text().strip()
        self.http.verify = self.ca

    def stop(self) -> None:
        stop(self.p)

    def rss(self, settle: float = 3.0) -> int:
        time.sleep(settle)
        return rss(self.p.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.p.pid)

    def api(self, method: str, path: str, doc=None, cred: str | None = None, want: int = 200):
        h = {"Authorization": f"Bearer {cred}"} if cred else {}
        r = self.http.request(method, self.base + "/api/v1" + path, json=doc, headers=h, timeout=30)
        if r.status_code != want:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:300]}")
        return r.json() if r.content else None

    def metric(self, name: str, **labels) -> float:
        text = self.http.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            if line.startswith(name + ("{" + want + "}" if want else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


# -- 1. enrollment -----------------------------------------------------------------------------


def make_otps(relay: Relay, n: int) -> list[str]:
    """``n`` OTPs: the first through the admin API (POST /api/v1/admin/otps),
    the rest through the code of `relayd admin otp create` on the data
    directory (the API gives an admin client 2 a second after a burst)."""
    from relayd.control.provisioning import Otps, Provisioning
    from relayd.control.store import Store

    codes = [relay.api("POST", "/admin/otps", {"device_name": f"sim-{i}"}, relay.key, 201)["otp"]
             for i in range(min(n, API_OTPS))]
    store = Store(relay.data / "relayd.db")
    try:
        prov = Provisioning(Otps(store), None, lambda: relay.base + "/.well-known/est", "")
        codes += [prov.issue({"device_name": f"sim-{i}"}, "cli")["otp"] for i in range(len(codes), n)]
    finally:
        store.close()
    return codes


def make_join_tokens(relay: Relay, n: int) -> list[tuple[str, str]]:
    """``n`` join tokens, as `relayd admin join-token` makes them (and bench/scale.py)."""
    from relayd.control.store import Store

    store = Store(relay.data / "relayd.db")
    try:
        return [store.create_join_token([], 3600) for _ in range(n)]
    finally:
        store.close()


async def run_pool(jobs: list, concurrency: int, one) -> list:
    """``one(job)`` for every job, ``concurrency`` at a time; results in order."""
    out: list = [None] * len(jobs)
    it = iter(enumerate(jobs))

    async def worker():
        for i, job in it:
            out[i] = await one(job)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def est_enroll(relay: Relay, jobs: list, concurrency: int) -> list:
    """simpleenroll for each (otp, key_pem, csr_b64): (agent_id, key_pem, cert_pem)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from relayd.agent import est
    from relayd.control.ca import cert_info
    from relayd.net import tls

    ctx = tls.client_context(relay.ca)

    async def one(job):
        otp, key_pem, csr_b64 = job
        body = await est.call(relay.base, "simpleenroll", ctx, body=csr_b64, authorization=est.basic(otp))
        cert = est.read_certs(body)[0].public_bytes(Encoding.PEM)  # leaf first (docs/devices.md)
        return cert_info(cert)["agent_id"], key_pem, cert

    return await run_pool(jobs, concurrency, one)


async def join_enroll(relay: Relay, jobs: list, concurrency: int) -> list:
    """The agents port's enroll request for each (token_id, secret, key_pem,
    csr_pem), as AgentNode.enroll sends it: (agent_id, key_pem, cert_pem)."""
    from relayd.core import wire
    from relayd.net import tls
    from relayd.net.preamble import ClientPreamble

    ctx = tls.client_context(relay.ca)
    loop = asyncio.get_running_loop()

    async def one(job):
        token_id, secret, key_pem, csr_pem = job
        pre = ClientPreamble(wire.EnrollRequest(token_id, secret, csr_pem.decode()))
        transport, _ = await loop.create_connection(lambda: pre, "127.0.0.1", relay.agents, ssl=ctx,
                                                    server_hostname="127.0.0.1")
        try:
            reply = wire.check_reply(await asyncio.wait_for(pre.reply, 30))
        finally:
            transport.close()
        return reply["agent_id"], key_pem, reply["cert"].encode()

    return await run_pool(jobs, concurrency, one)


def save_identities(relay: Relay, root: Path, enrolled: list, est_link: bool) -> list[Path]:
    """Each enrolled identity in an agent data directory, stored by the
    agent's own code, as `relayd agent --otp` / `--join` leave it."""
    from relayd.agent import AgentNode
    from relayd.config import AgentConfig

    ca_pem = Path(relay.ca).read_text()
    host_port = f"127.0.0.1:{relay.https}"
    dirs = []
    for i, (agent_id, key_pem, cert_pem) in enumerate(enrolled):
        d = root / f"a{i}"
        node = AgentNode(AgentConfig(data=d))
        node._save_ca(ca_pem)
        if est_link:  # what enroll_est stores: the link over the HTTPS port
            ident = {"agent_id": agent_id, "relay": None, "wss": host_port, "server_hostname": "127.0.0.1",
                     "est": relay.base}
        else:
            ident = {"agent_id": agent_id, "relay": f"127.0.0.1:{relay.agents}", "wss": host_port,
                     "server_hostname": "127.0.0.1"}
        node._save_identity(ident, key_pem, cert_pem, host_port, "bench")
        dirs.append(d)
    return dirs


def bench_enroll(relay: Relay, n: int, concurrency: int, rounds: int, tmp: Path) -> tuple[dict, dict]:
    from relayd.control.ca import generate_key_and_csr
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    otps = make_otps(relay, n)
    tokens = make_join_tokens(relay, n)
    # Keys and CSRs beforehand: the figure is the relay's cost, not the client's.
    est_jobs, join_jobs = [], []
    for otp in otps:
        key_pem, csr_pem = generate_key_and_csr("relayd-agent")
        est_jobs.append((otp, key_pem, base64.b64encode(x509.load_pem_x509_csr(csr_pem).public_bytes(Encoding.DER))))
    for token_id, secret in tokens:
        key_pem, csr_pem = generate_key_and_csr("relayd-agent")
        join_jobs.append((token_id, secret, key_pem, csr_pem))
    kinds = {"EST simpleenroll (OTP)": (est_enroll, est_jobs), "join token (agents port)": (join_enroll, join_jobs)}
    done = {k: [] for k in kinds}
    secs = {k: [] for k in kinds}
    cpu = {k: 0.0 for k in kinds}
    per = -(-n // rounds)
    for r in range(rounds):
        # Taken in turn, the first kind alternating: the machine's speed drifts.
        for k in (list(kinds) if r % 2 == 0 else list(kinds)[::-1]):
            fn, jobs = kinds[k]
            chunk = jobs[r * per:(r + 1) * per]
            c0, t0 = relay.cpu(), time.perf_counter()
            done[k] += asyncio.run(fn(relay, chunk, concurrency))
            secs[k].append(time.perf_counter() - t0)
            cpu[k] += relay.cpu() - c0
    out = {}
    for k in kinds:
        out[k] = {"n": len(done[k]), "seconds": sum(secs[k]), "per_s": len(done[k]) / sum(secs[k]),
                  "rounds_per_s": [round(len(kinds[k][1][r * per:(r + 1) * per]) / s, 1) for r, s in enumerate(secs[k])],
                  "relay_cpu_ms": cpu[k] / len(done[k]) * 1000}
    t0 = time.perf_counter()
    dirs = {"devices": save_identities(relay, tmp / "devices", done["EST simpleenroll (OTP)"], True),
            "agents": save_identities(relay, tmp / "agents", done["join token (agents port)"], False)}
    print(f"identities stored in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out, dirs


# -- 2. idle devices ---------------------------------------------------------------------------


async def role_sim(dirs_file: str, service_port: int, connecting: int, out: str) -> None:
    """Device simulator: one AgentNode per data directory, each its own TLS
    link and yamux session (an EST device's over the HTTPS port's
    WebSocket, a join-token agent's to the agents port), kept up idle."""
    import logging

    from relayd.agent import AgentNode
    from relayd.config import AgentConfig

    logging.basicConfig(level=logging.WARNING)
    dirs = Path(dirs_file).read_text().split()
    sem = asyncio.Semaphore(connecting)
    nodes, failed = [], []

    async def one(d: str) -> None:
        async with sem:
            a = AgentNode(AgentConfig(data=Path(d), endpoints={"device": ("127.0.0.1", service_port)}))
            try:
                await a.start()
                await asyncio.wait_for(a.connected.wait(), 120)
                nodes.append(a)
            except Exception as exc:
                failed.append(f"{d}: {type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(d) for d in dirs))
    Path(out).write_text(json.dumps({"connected": len(nodes), "failed": failed[:5], "n_failed": len(failed),
                                     "seconds": time.perf_counter() - t0,
                                     "reconnects": sum(a.reconnects for a in nodes)}))
    while True:
        await asyncio.sleep(1)
        live = {"connected": sum(a.connected.is_set() for a in nodes), "reconnects": sum(a.reconnects for a in nodes)}
        tmp = Path(out + ".live.tmp")
        tmp.write_text(json.dumps(live))
        tmp.replace(out + ".live")


def bench_idle(relay: Relay, dirs: list[Path], name: str, tmp: Path, service_port: int, idle: float) -> dict:
    """A fresh relay, then every identity of ``dirs`` connected and idle."""
    relay.start(f"relay-idle-{name}")
    try:
        base = relay.rss()
        sims = []
        t0 = time.perf_counter()
        for i in range(SIMS):
            part = dirs[i::SIMS]
            if not part:
                continue
            lst = tmp / f"{name}-sim{i}.dirs"
            lst.write_text("\n".join(map(str, part)))
            out = tmp / f"{name}-sim{i}.json"
            p = relay.procs.start(f"sim-{name}-{i}", [PY, __file__, "--role", "sim", "--dirs", str(lst),
                                                      "--service-port", str(service_port), "--out", str(out)],
                                  preexec_fn=raise_nofile)
            p.log_path = tmp / f"sim-{name}-{i}.log"
            sims.append((p, out))
        reports = [json.loads(wait_file(out, 1800, p)) for p, out in sims]
        connect_s = time.perf_counter() - t0
        connected = sum(r["connected"] for r in reports)
        after = relay.rss(5.0)
        c0 = relay.cpu()
        time.sleep(idle)
        idle_cpu = (relay.cpu() - c0) / idle
        after2 = rss(relay.p.pid)
        live = [json.loads(Path(str(out) + ".live").read_text()) for _, out in sims]
        sim_rss = sum(rss(p.pid) for p, _ in sims)
        online = relay.metric("relayd_active_listeners")
        for p, _ in sims:
            stop(p)
        return {"n": len(dirs), "connected": connected, "failed": [f for r in reports for f in r["failed"]][:5],
                "still_connected": sum(x["connected"] for x in live),
                # links that failed and came back: while connecting (admission refusals, timeouts), then idle
                "connect_retries": sum(r["reconnects"] for r in reports),
                "reconnects": sum(x["reconnects"] for x in live) - sum(r["reconnects"] for r in reports),
                "relay_online": online, "connect_s": connect_s, "rss_empty": base, "rss_connected": after,
                "rss_after_idle": after2, "per_device_kib": (after - base) / max(1, connected) / 1024,
                "idle_cpu_pct": idle_cpu * 100, "sim_rss": sim_rss, "sims": len(sims)}
    finally:
        relay.stop()


# -- 3. device proxy against the plain HTTP endpoint --------------------------------------------


def start_device(relay: Relay, procs: Procs, tmp: Path, backend: int) -> dict:
    """A `relayd agent --otp --est` process (an OTP from the admin API),
    serving the back end as its ``device`` and as ``web`` (the relay's HTTP
    endpoint), with its local forwarder; a local user claims it."""
    otp = relay.api("POST", "/admin/otps", {"device_name": "bench-cam"}, relay.key, 201)
    api_port = free_port()
    procs.start("device-agent", [PY, "-m", "relayd.cli", "agent", "--data", str(tmp / "dev"), "--otp", otp["otp"],
                                 "--est", relay.base, "--pin", otp["ca_sha256"],
                                 "--endpoint", f"device=127.0.0.1:{backend}", "--endpoint", f"web=127.0.0.1:{backend}",
                                 "--device-api", f"127.0.0.1:{api_port}"])
    code_file = tmp / "dev" / "claim_code"
    until_sync(code_file.exists, 60, "the device got no claim code")
    device_id = json.loads((tmp / "dev" / "identity.json").read_text())["agent_id"]
    relay.api("POST", "/admin/users", {"username": "bench", "password": PASSWORD}, relay.key, 201)
    user = relay.api("POST", "/users/token", {"username": "bench", "password": PASSWORD})["token"]
    relay.api("POST", "/devices/claim", {"claim_code": code_file.read_text().strip()}, user)
    wait_port(api_port, 30)
    return {"id": device_id, "user": user, "api_port": api_port}


def bench_proxy(relay: Relay, dev: dict, seconds: int, conns: int, repeat: int) -> dict:
    plain = f"{relay.base}/"
    proxy = f"{relay.base}/api/v1/devices/{dev['id']}/proxy/"

    def token():
        return relay.api("POST", "/token", {"device_id": dev["id"]}, dev["user"])["token"]

    for url, auth in ((plain, None), (proxy, token())):
        h = {"Authorization": f"Bearer {auth}"} if auth else {}
        r = relay.http.get(url, headers=h, timeout=10)
        if r.status_code != 200 or not r.text.startswith("hello"):
            raise RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
        wrk(url, 1, conns, headers=[f"Authorization: Bearer {auth}"] if auth else ())  # warm up
    runs = {"plain HTTP endpoint": [], "device proxy": []}
    admitted0 = relay.metric("relayd_device_proxy_requests_total", result="admitted")
    for r in range(repeat):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in order:
            if name == "device proxy":
                runs[name].append(wrk(proxy, seconds, conns, headers=[f"Authorization: Bearer {token()}"]))
            else:
                runs[name].append(wrk(plain, seconds, conns))
    admitted = relay.metric("relayd_device_proxy_requests_total", result="admitted") - admitted0
    out = {}
    for name, xs in runs.items():
        rps, p99 = sorted(xs)[len(xs) // 2]
        out[name] = {"rps": rps, "p99_us": p99, "runs": [round(x[0]) for x in xs]}
    out["proxy_admitted"] = admitted
    return out


# -- 4. event to webhook --------------------------------------------------------------------------


async def bench_webhook(relay: Relay, dev: dict, events: int) -> dict:
    import ssl

    from standardwebhooks.webhooks import Webhook

    from relayd.control import devicegw

    arrived: dict[str, tuple[float, dict, bytes]] = {}
    waiting: dict[str, asyncio.Future] = {}

    async def receive(r, w):
        try:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            body = await r.readexactly(int(headers.get("content-length", 0)))
            t = time.perf_counter()
            eid = headers.get("webhook-id", "")
            arrived[eid] = (t, headers, body)
            w.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await w.drain()
            fut = waiting.pop(eid, None)
            if fut is not None and not fut.done():
                fut.set_result(t)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(receive, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    hook = await asyncio.to_thread(relay.api, "POST", "/webhooks", {"url": f"http://127.0.0.1:{port}/hook",
                                                                   "events": ["device.notification"]},
                                   dev["user"], 201)
    token = devicegw.DeviceTokens(devicegw.load_or_create_key(relay.data)).issue(dev["id"])[0]
    ctx = ssl.create_default_context(cafile=relay.ca)
    json_h = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close"}
    paths = {
        "HTTPS, device token": lambda body: http_request(
            "127.0.0.1", relay.https, "POST", "/api/v1/device/notifications", body,
            {**json_h, "Authorization": f"Bearer {token}", "Content-Length": str(len(body))}, ctx),
        "agent's local forwarder": lambda body: http_request(
            "127.0.0.1", dev["api_port"], "POST", "/api/v1/device/notifications", body,
            {**json_h, "Content-Length": str(len(body))}),
    }
    got = {k: {"post_ms": [], "webhook_ms": []} for k in paths}
    verified = 0
    loop = asyncio.get_running_loop()
    for i in range(2 * events + 10):  # the paths in turn
        name = list(paths)[i % 2]
        body = note(data={"n": i})
        t0 = time.perf_counter()
        status, _, answer = await paths[name](body)
        t1 = time.perf_counter()
        if status != 202:
            raise RuntimeError(f"{name}: notification answered {status} {answer[:200]}")
        eid = orjson.loads(answer)["id"]
        if eid in arrived:
            t2 = arrived[eid][0]
        else:
            fut = waiting[eid] = loop.create_future()
            t2 = await asyncio.wait_for(fut, 30)
        if i >= 10:  # the first ones warm up
            got[name]["post_ms"].append((t1 - t0) * 1000)
            got[name]["webhook_ms"].append((t2 - t0) * 1000)
        _, headers, raw = arrived[eid]
        Webhook(hook["secret"]).verify(raw, headers)
        verified += 1
        await asyncio.sleep(max(0.0, EVENT_GAP - (time.perf_counter() - t0)))
    srv.close()
    out = {"verified": verified}
    for name, g in got.items():
        out[name] = {k: {"median": statistics.median(v), "p99": pct(v, 0.99), "n": len(v)} for k, v in g.items()}
    return out


# -- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 devices, short runs (about 3 minutes)")
    ap.add_argument("--devices", type=int, help="devices (and join-token agents) enrolled and connected")
    ap.add_argument("--concurrency", type=int, default=16, help="enrollments in flight")
    ap.add_argument("--rounds", type=int, default=4, help="enrollment rounds, the two kinds in turn")
    ap.add_argument("--idle", type=float, help="seconds the relay's CPU is read with every device idle")
    ap.add_argument("--seconds", type=int, help="each wrk run")
    ap.add_argument("--conns", type=int, default=16, help="wrk connections")
    ap.add_argument("--repeat", type=int, help="wrk runs per path, taken in turn")
    ap.add_argument("--events", type=int, help="notifications per path")
    ap.add_argument("--out", help="write the JSON summary here too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    ap.add_argument("--role", choices=["sim"], help=argparse.SUPPRESS)
    ap.add_argument("--dirs", help=argparse.SUPPRESS)
    ap.add_argument("--service-port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    raise_nofile()
    import uvloop

    if a.role == "sim":
        uvloop.run(role_sim(a.dirs, a.service_port, SIM_CONNECTING, a.out))
        return
    q = a.quick
    n = a.devices or (500 if q else 10_000)
    idle = a.idle or (10.0 if q else 30.0)
    seconds, repeat, events = a.seconds or (3 if q else 5), a.repeat or (1 if q else 3), a.events or (60 if q else 300)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"file descriptors: soft limit raised to {soft} (hard {hard}); {n} links need {n} on the relay and "
          f"{-(-n // SIMS)} per simulator process", file=sys.stderr)
    if n + 512 > hard:
        raise SystemExit(f"{n} devices need more than the hard limit of {hard} descriptors on the relay")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    tmp = Path(tempfile.mkdtemp(prefix="relayd-devbench-"))
    procs = Procs(tmp)
    results: dict = {"devices": n, "concurrency": a.concurrency, "nofile": hard}
    try:
        b = free_port()
        backend = nginx_conf(tmp, "backend", f"""server {{ listen 127.0.0.1:{b};
            location / {{ return 200 "hello from the back end\\n"; }} }}""")
        procs.start("backend", ["nginx", "-c", str(backend)])
        wait_port(b)
        relay = Relay(procs, tmp)

        relay.start("relay-enroll")
        print(f"1. enrolling {n} devices over EST and {n} agents with join tokens", file=sys.stderr)
        results["enroll"], dirs = bench_enroll(relay, n, a.concurrency, a.rounds, tmp)
        relay.stop()

        results["idle"] = {}
        for kind in ("devices", "agents"):
            print(f"2. {n} idle {kind}", file=sys.stderr)
            results["idle"][kind] = bench_idle(relay, dirs[kind], kind, tmp, b, idle)

        relay.start("relay-proxy")
        dev = start_device(relay, procs, tmp, b)
        print("3. device proxy against the plain HTTP endpoint", file=sys.stderr)
        results["proxy"] = bench_proxy(relay, dev, seconds, a.conns, repeat)
        print("4. event to webhook", file=sys.stderr)
        results["webhook"] = asyncio.run(bench_webhook(relay, dev, events))
    finally:
        procs.stop()
        if a.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", str(tmp)])
    report(results, a, seconds, repeat, events)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


def report(r: dict, a, seconds: int, repeat: int, events: int) -> None:
    mib = 2 ** 20
    e = r["enroll"]
    est, jt = e["EST simpleenroll (OTP)"], e["join token (agents port)"]
    print(f"\n1. Enrollment, {r['devices']} of each kind, {a.concurrency} in flight, {a.rounds} rounds in turn "
          "(CSRs made beforehand; a new TLS connection per enrollment)\n")
    print("| path | enrolled | per second | per second by round | relay CPU ms per enrollment |")
    print("|---|---:|---:|---|---:|")
    for k, v in e.items():
        print(f"| {k} | {v['n']:,} | {v['per_s']:,.1f} | {', '.join(map(str, v['rounds_per_s']))} | "
              f"{v['relay_cpu_ms']:.2f} |")
    print(f"\nEST / join token: {est['per_s'] / jt['per_s']:.2f}x the rate, "
          f"{est['relay_cpu_ms'] / jt['relay_cpu_ms']:.2f}x the relay CPU per enrollment")

    print("\n2. Idle links on one relay (fresh `relayd serve` each; RSS 3-5 s after the last link came up)\n")
    print("| kind | connected | relay RSS empty MiB | connected MiB | after idle MiB | KiB per link | "
          "relay CPU idle % of a core | connect all s | simulators RSS MiB | link retries connecting / idle |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    names = {"devices": "EST devices (WebSocket link on the HTTPS port)",
             "agents": "join-token agents (TLS link on the agents port)"}
    for k, v in r["idle"].items():
        print(f"| {names[k]} | {v['connected']:,} / {v['n']:,} | {v['rss_empty'] / mib:.1f} | "
              f"{v['rss_connected'] / mib:.1f} | {v['rss_after_idle'] / mib:.1f} | {v['per_device_kib']:.1f} | "
              f"{v['idle_cpu_pct']:.1f} | {v['connect_s']:.1f} | {v['sim_rss'] / mib:.0f} ({v['sims']} processes) | "
              f"{v['connect_retries']} / {v['reconnects']} |")
    d, g = r["idle"]["devices"], r["idle"]["agents"]
    print(f"\ndevice / agent: memory per link {d['per_device_kib'] / g['per_device_kib']:.2f}x, "
          f"idle CPU {d['idle_cpu_pct'] / max(g['idle_cpu_pct'], 1e-9):.2f}x")
    for k, v in r["idle"].items():
        if v["failed"] or v["still_connected"] != v["connected"]:
            print(f"{k}: {v['still_connected']} still connected after the idle window; failures: {v['failed']}")

    p = r["proxy"]
    print(f"\n3. wrk -t1 -c{a.conns} -d{seconds}s, small GET with keep-alive, median of {repeat} runs in turn\n")
    print("| path | requests/s | p99 latency us | runs |")
    print("|---|---:|---:|---|")
    for k in ("plain HTTP endpoint", "device proxy"):
        print(f"| {k} | {p[k]['rps']:,.0f} | {p[k]['p99_us']:,.0f} | {', '.join(f'{x:,}' for x in p[k]['runs'])} |")
    pl, dp = p["plain HTTP endpoint"], p["device proxy"]
    print(f"\ndevice proxy / plain endpoint: requests/s {dp['rps'] / pl['rps']:.2f}x, p99 {dp['p99_us'] / pl['p99_us']:.2f}x"
          f" ({p['proxy_admitted']:,.0f} proxy requests admitted)")

    w = r["webhook"]
    print(f"\n4. Notification to webhook, {events} events per path, one at a time "
          f"({w['verified']} signatures verified by standardwebhooks)\n")
    print("| device posts through | POST round trip median ms | p99 ms | to webhook median ms | p99 ms | "
          "webhook / POST (medians) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in ("HTTPS, device token", "agent's local forwarder"):
        v = w[k]
        print(f"| {k} | {v['post_ms']['median']:.2f} | {v['post_ms']['p99']:.2f} | {v['webhook_ms']['median']:.2f} | "
              f"{v['webhook_ms']['p99']:.2f} | {v['webhook_ms']['median'] / v['post_ms']['median']:.2f}x |")
    print("\n" + json.dumps(r))


if __name__ == "__main__":
    main()
