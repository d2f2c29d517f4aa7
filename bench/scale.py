"""Memory cost of idle agents and open streams on one relay node.

    .venv/bin/python bench/scale.py --agents 1000 --streams 10000

Four processes on loopback, so no file-descriptor limit is shared: the relay
(`relayd serve`), one process running N enrolled agents (relayd.agent.AgentNode,
each with its own identity, TLS link and yamux session), one echo service,
and this process holding the public client connections. The relay's RSS is
read from /proc before agents connect, with N idle agents, and with M open
streams (each a public connection that has echoed one byte and stays open).
Stops every process it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- roles ---------------------------------------------------------------------------


async def role_service(port_file: str) -> None:
    async def echo(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=4096)
    Path(port_file).write_text(str(srv.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


async def role_agents(relay_data: str, n: int, service_port: int, ready_file: str) -> None:
    from relayd.agent import AgentNode
    from relayd.config import AgentConfig
    from relayd.control.ca import CertificateAuthority
    from relayd.control.jointoken import JoinToken
    from relayd.control.store import Store
    import orjson

    data = Path(relay_data)
    store = Store(data / "relayd.db")
    pin = CertificateAuthority.load_or_create(data / "ca").pin
    addr = orjson.loads((data / "relay.json").read_bytes())["advertised"]
    tmp = Path(tempfile.mkdtemp(prefix="relayd-scale-agents-"))
    agents = []
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            tid, secret = store.create_join_token(["svc"], 600)
            a = AgentNode(AgentConfig(data=tmp / f"a{i}", join=JoinToken(addr, pin, tid, secret).encode(),
                                      endpoints={"svc": ("127.0.0.1", service_port)}))
            await a.start()
            await asyncio.wait_for(a.connected.wait(), 60)
            agents.append(a)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    Path(ready_file).write_text(f"{time.perf_counter() - t0:.2f}")
    await asyncio.Event().wait()


# -- orchestration --------------------------------------------------------------------------


def spawn(args, log: Path, **kw):
    # Logs go to a file: an undrained pipe would block a chatty process.
    f = open(log, "wb")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=f, **kw)
    p.log_path = log
    return p


def stop(p) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


def wait_file(path: Path, timeout: float, proc) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"process died: {proc.log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {path}")


def settle_rss(pid: int, seconds: float = 2.0) -> int:
    time.sleep(seconds)
    return rss(pid)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--role", choices=["service", "agents"])
    ap.add_argument("--relay-data")
    ap.add_argument("--service-port", type=int)
    ap.add_argument("--file")
    ap.add_argument("--pure", action="store_true", help="RELAYD_NO_EXTENSIONS=1 for the relay")
    args = ap.parse_args()
    raise_nofile()
    import uvloop

    if args.role == "service":
        uvloop.run(role_service(args.file))
        return
    if args.role == "agents":
        uvloop.run(role_agents(args.relay_data, args.agents, args.service_port, args.file))
        return

    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="relayd-scale-"))
    agents_port, public_port = free_port(), free_port()
    env = dict(os.environ, **({"RELAYD_NO_EXTENSIONS": "1"} if args.pure else {}))
    relay = spawn([py, "-m", "relayd.cli", "serve", "--data", str(tmp / "relay"), "--agents",
                   f"127.0.0.1:{agents_port}", "--tcp", f"svc=127.0.0.1:{public_port}"], tmp / "relay.log",
                  env=env, preexec_fn=raise_nofile)
    procs = [relay]
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", agents_port), 0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(relay.log_path.read_text()[-2000:])
                time.sleep(0.1)
        base = settle_rss(relay.pid, 1.0)
        svc = spawn([py, __file__, "--role", "service", "--file", str(tmp / "svc.port")], tmp / "svc.log")
        procs.append(svc)
        service_port = int(wait_file(tmp / "svc.port", 20, svc))
        ag = spawn([py, __file__, "--role", "agents", "--agents", str(args.agents), "--relay-data",
                    str(tmp / "relay"), "--service-port", str(service_port), "--file", str(tmp / "agents.ready")],
                   tmp / "agents.log")
        procs.append(ag)
        enroll_s = float(wait_file(tmp / "agents.ready", 600, ag))
        with_agents = settle_rss(relay.pid)
        agents_rss = rss(ag.pid)

        socks = []
        checked = 0
        t0 = time.perf_counter()
        for i in range(args.streams):
            s = socket.create_connection(("127.0.0.1", public_port), 10)
            s.sendall(b"x")
            socks.append(s)
            if len(socks) - checked >= 500 or i == args.streams - 1:
                for t in socks[checked:]:
                    t.settimeout(10)
                    assert t.recv(1) == b"x"
                checked = len(socks)
        open_s = time.perf_counter() - t0
        with_streams = settle_rss(relay.pid)
        agents_rss_streams = rss(ag.pid)
        for s in socks:
            s.close()
        per_agent = (with_agents - base) / max(1, args.agents)
        per_1000 = (with_streams - with_agents) / max(1, args.streams) * 1000
        build = "pure" if args.pure else "compiled"
        print(f"| relayd {build} | {args.agents} | {args.streams} | {base / 2**20:.1f} | {with_agents / 2**20:.1f} | "
              f"{with_streams / 2**20:.1f} | {per_agent / 1024:.1f} | {per_1000 / 2**20:.2f} | "
              f"{(agents_rss_streams - agents_rss) / max(1, args.streams) * 1000 / 2**20:.2f} | "
              f"{enroll_s:.1f} | {open_s:.1f} |")
    finally:
        for p in reversed(procs):
            stop(p)


HEADER = ("| build | idle agents | open streams | relay RSS empty MiB | with agents MiB | with streams MiB | "
          "KiB per idle agent | MiB per 1000 streams (relay) | MiB per 1000 streams (agent side) | "
          "enroll+connect all agents s | open all streams s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

if __name__ == "__main__":
    if len(sys.argv) == 1 or "--role" not in sys.argv:
        print(HEADER)
    main()
