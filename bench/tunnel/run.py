#!/usr/bin/env python3
"""Side-by-side TCP path benchmark: direct, HAProxy, a Go yamux tunnel, relayd.

    python bench/tunnel/run.py --targets direct,haproxy,gotunnel,relayd,relayd-pure \
        --seconds 5 --out bench/results/tunnel.json

Everything runs on loopback (127.0.0.1) in one temp dir, targets one after
another, never concurrently. Each target is set up twice with a single
mapping: once in front of an iperf3 server (throughput and CPU per GB), once
in front of an echo server (idle RSS, RSS of 1000 held connections, request/
response latency, half-close probe, new connections per second). Every
process is started here and stopped here, by PID. See README.md for what the
columns mean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import gobuild  # noqa: E402

DEFAULT_TARGETS = ("direct", "haproxy", "gotunnel", "relayd", "relayd-pure")
# Optional fairness variants: HAProxy with one thread per core, the Go tunnel
# with one P per process (like one event loop per relayd process).
ALL_TARGETS = DEFAULT_TARGETS + ("haproxy-mt", "gotunnel-p1")
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- processes


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parens: fields resume after the last ')'.
    return raw[raw.rindex(")") + 2:].split()  # index 0 = field 3 (state)


def _starttime(pid: int) -> str | None:
    f = _stat_fields(pid)
    return f[19] if f else None  # field 22


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of pid (scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(int(entry))
        if f:
            children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime (all threads, fields 14/15) plus reaped children's (16/17)."""
    ticks = 0
    for pid in pids:
        f = _stat_fields(pid)
        if f:
            ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def rss_kib(pids: list[int], field: str = "VmRSS:") -> int:
    """Summed RSS of ``pids`` (``VmHWM:``: their peaks since they started,
    or since ``reset_peak_rss``)."""
    total = 0
    for pid in pids:
        try:
            for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_peak_rss(pids: list[int]) -> None:
    """Start ``VmHWM`` over at the current RSS (``clear_refs`` 5, Linux 4.0+),
    so that each run's peak is its own."""
    for pid in pids:
        try:
            pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def rss_by_proc(procs: list, field: str = "VmRSS:") -> dict[str, int]:
    """``rss_kib`` of each harness process (with its descendants), by name."""
    return {p.name: rss_kib(p.tree(), field) for p in procs}


class Proc:
    """A process started by the harness, its output in a log file."""

    def __init__(self, name: str, argv: list[str], logdir: pathlib.Path,
                 env: dict[str, str] | None = None, stdin_pipe: bool = False):
        self.name = name
        self.argv = argv
        self.log = logdir / f"{name}.{int(time.monotonic() * 1000)}.log"
        self._fh = open(self.log, "wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
        self.pid = self.popen.pid
        self._start = _starttime(self.pid)

    def tree(self) -> list[int]:
        return [self.pid] + descendants(self.pid) if self.popen.poll() is None else []

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(prefix):
                    return line
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode} before "
                                   f"printing {prefix!r}:\n{self.tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no {prefix!r} line within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM then SIGKILL this PID; then any descendants it left, by PID."""
        kids = []
        if self.popen.poll() is None:
            kids = [(k, _starttime(k)) for k in descendants(self.pid)]
            try:
                if self.popen.stdin:
                    self.popen.stdin.close()
            except OSError:
                pass
            self.popen.terminate()
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(grace)
        for kid, start in kids:  # only if it is still the same process
            if start is not None and _starttime(kid) == start:
                try:
                    os.kill(kid, signal.SIGKILL)
                except OSError:
                    pass
        self._fh.close()


class Registry:
    """Every process the harness started, so teardown never misses one."""

    def __init__(self, logdir: pathlib.Path):
        self.logdir = logdir
        self.live: list[Proc] = []

    def start(self, name: str, argv: list[str], **kw) -> Proc:
        p = Proc(name, argv, self.logdir, **kw)
        self.live.append(p)
        return p

    def stop(self, procs: list[Proc]) -> None:
        for p in reversed(procs):
            p.stop()
            if p in self.live:
                self.live.remove(p)

    def stop_all(self) -> None:
        self.stop(list(self.live))


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A free loopback port below the ephemeral range (clients churn through that)."""
    for _ in range(200):
        port = random.randint(20000, 32000)
        s = socket.socket()
        try:
            s.bind((HOST, port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


def run_cmd(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def echo_round_trip(port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"p")
            return s.recv(1) == b"p"
    except OSError:
        return False


def iperf_client(port: int, *, seconds: float | None = None, streams: int = 1,
                 nbytes: str | None = None, timeout: float = 60.0) -> dict:
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-J", "--connect-timeout", "3000",
            "-P", str(streams)]
    argv += ["-n", nbytes] if nbytes else ["-t", str(seconds)]
    try:
        res = run_cmd(argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"iperf3 client timed out after {timeout}s"}
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return {"error": f"iperf3 rc={res.returncode}: {res.stdout[-300:]}{res.stderr[-300:]}"}
    if data.get("error"):
        return {"error": data["error"]}
    end = data["end"]
    return {
        "gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
        "bytes": end["sum_received"]["bytes"],
        "seconds": end["sum_received"]["seconds"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "iperf_cpu_host_pct": end.get("cpu_utilization_percent", {}).get("host_total"),
        "iperf_cpu_remote_pct": end.get("cpu_utilization_percent", {}).get("remote_total"),
    }


def tls_probe(port: int) -> str:
    """Version and cipher suite a default OpenSSL client gets from a TLS listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((HOST, port), timeout=3) as raw:
            with ctx.wrap_socket(raw) as s:
                return f"{s.version()} {s.cipher()[0]}"
    except (OSError, ssl.SSLError) as exc:
        return f"probe failed: {exc}"


def wait_ready(kind: str, port: int, timeout: float, procs: list[Proc]) -> float:
    """Poll until a connection through the path completes a round trip."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    last = ""
    while time.monotonic() < deadline:
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited {p.popen.returncode}:\n{p.tail()}")
        if kind == "echo":
            if echo_round_trip(port):
                return time.monotonic() - t0
        else:
            r = iperf_client(port, nbytes="64K", timeout=10)
            if "error" not in r:
                return time.monotonic() - t0
            last = r["error"]
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise RuntimeError(f"path not ready within {timeout}s ({last})\n{tails}")


# --------------------------------------------------------------------------- targets


class Ctx:
    def __init__(self, args, tmp: pathlib.Path, reg: Registry, bins: dict[str, pathlib.Path]):
        self.args = args
        self.tmp = tmp
        self.reg = reg
        self.bins = bins
        self.cert = tmp / "tls" / "cert.pem"
        self.key = tmp / "tls" / "key.pem"
        self.info: dict[str, dict] = {}


def make_cert(ctx: Ctx) -> None:
    """Throwaway self-signed ECDSA P-256 certificate for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnel-bench")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    ctx.cert.parent.mkdir(parents=True, exist_ok=True)
    ctx.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ctx.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ctx.key.chmod(0o600)


def setup_direct(ctx: Ctx, target_port: int, phase: str) -> tuple[int, list[Proc]]:
    return target_port, []


def setup_haproxy(ctx: Ctx, target_port: int, phase: str,
                  threads: int | None = None) -> tuple[int, list[Proc]]:
    port = free_port()
    threads = threads or ctx.args.haproxy_threads
    cfg = ctx.tmp / f"haproxy-{phase}.cfg"
    cfg.write_text(f"""\
global
    nbthread {threads}
    maxconn 4096

defaults
    mode tcp
    maxconn 4096
    timeout connect 5s
    timeout client 1h
    timeout server 1h

listen bench
    bind {HOST}:{port}
    server target {HOST}:{target_port}
""")
    p = ctx.reg.start(f"haproxy-{phase}", ["haproxy", "-db", "-f", str(cfg)])
    return port, [p]


def setup_gotunnel(ctx: Ctx, target_port: int, phase: str,
                   gomaxprocs: int | None = None) -> tuple[int, list[Proc]]:
    agents, public = free_port(), free_port()
    env = dict(os.environ)
    env.pop("GOMAXPROCS", None)
    gomaxprocs = gomaxprocs or ctx.args.gomaxprocs
    if gomaxprocs:
        env["GOMAXPROCS"] = str(gomaxprocs)
    relay = ctx.reg.start(f"gotunnel-relay-{phase}", [
        str(ctx.bins["gotunnel"]), "-mode", "relay", "-agents", f"{HOST}:{agents}",
        "-public", f"{HOST}:{public}", "-cert", str(ctx.cert), "-key", str(ctx.key)], env=env)
    relay.wait_line("READY", 10)
    agent = ctx.reg.start(f"gotunnel-agent-{phase}", [
        str(ctx.bins["gotunnel"]), "-mode", "agent", "-relay", f"{HOST}:{agents}",
        "-ca", str(ctx.cert), "-target", f"{HOST}:{target_port}"], env=env)
    line = agent.wait_line("CONNECTED", 10)
    ctx.info["gotunnel_tls"] = line.split(None, 1)[1]
    return public, [relay, agent]


def _relayd_env(pure: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RELAYD_NO_EXTENSIONS", None)
    if pure:
        env["RELAYD_NO_EXTENSIONS"] = "1"
    return env


def setup_relayd(ctx: Ctx, target_port: int, phase: str, pure: bool) -> tuple[int, list[Proc]]:
    relayd = ctx.args.relayd
    env = _relayd_env(pure)
    label = "relayd-pure" if pure else "relayd"
    # Fresh directories for every repeat: each run enrolls from scratch.
    run_dir = pathlib.Path(tempfile.mkdtemp(dir=ctx.tmp, prefix=f"{label}-{phase}-"))
    sdir = run_dir / "relay"
    adir = run_dir / "agent"
    agents, public = free_port(), free_port()
    argv = [relayd, "serve", "--data", str(sdir), "--agents", f"{HOST}:{agents}",
            "--tcp", f"bench={HOST}:{public}"]
    if ctx.args.relayd_metrics:
        argv += ["--metrics", f"{HOST}:{free_port()}"]
    serve = ctx.reg.start(f"{label}-serve-{phase}", argv, env=env)
    procs = [serve]
    # The join token needs the relay's CA and database, created by serve on start.
    deadline = time.monotonic() + 30
    token, err = None, ""
    while time.monotonic() < deadline:
        if serve.popen.poll() is not None:
            raise RuntimeError(f"relayd serve exited {serve.popen.returncode}:\n{serve.tail()}")
        try:
            with socket.create_connection((HOST, agents), timeout=1):
                pass
            res = run_cmd([relayd, "admin", "join-token", "--data", str(sdir),
                           "--endpoint", "bench", "--ttl", "15m"], timeout=30, env=env)
            lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
            if res.returncode == 0 and len(lines) == 1:
                token = lines[0].strip()
                break
            err = f"join-token rc={res.returncode}: {res.stdout[-300:]}{res.stderr[-300:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            err = str(exc)
        time.sleep(0.2)
    if token is None:
        raise RuntimeError(f"no join token within 30s ({err})\n{serve.tail()}")
    ctx.info[f"{label}_tls"] = tls_probe(agents)
    agent = ctx.reg.start(f"{label}-agent-{phase}", [
        relayd, "agent", "--join", token, "--data", str(adir),
        "--endpoint", f"bench={HOST}:{target_port}"], env=env)
    procs.append(agent)
    return public, procs


SETUP = {
    "direct": setup_direct,
    "haproxy": setup_haproxy,
    "gotunnel": setup_gotunnel,
    "relayd": lambda c, t, ph: setup_relayd(c, t, ph, pure=False),
    "relayd-pure": lambda c, t, ph: setup_relayd(c, t, ph, pure=True),
    "haproxy-mt": lambda c, t, ph: setup_haproxy(c, t, ph, threads=os.cpu_count()),
    "gotunnel-p1": lambda c, t, ph: setup_gotunnel(c, t, ph, gomaxprocs=1),
}


# --------------------------------------------------------------------------- measurements


def settle(seconds: float) -> None:
    time.sleep(seconds)


def run_target(ctx: Ctx, name: str) -> dict:
    a = ctx.args
    reg = ctx.reg
    out: dict = {"target": name}
    servers: list[Proc] = []
    procs: list[Proc] = []
    try:
        iperf_port = free_port()
        iperf_srv = reg.start(f"iperf3-server-{name}", ["iperf3", "-s", "-B", HOST, "-p", str(iperf_port),
                                                          "--forceflush"])
        servers.append(iperf_srv)
        echo_srv = reg.start(f"echo-server-{name}", [str(ctx.bins["rr"]), "-mode", "echo",
                                                      "-listen", f"{HOST}:0"])
        servers.append(echo_srv)
        echo_port = int(echo_srv.wait_line("LISTEN", 10).rsplit(":", 1)[1])
        iperf_srv.wait_line("Server listening", 10)

        # ---- phase A: throughput and CPU per GB, in front of iperf3
        public, procs = SETUP[name](ctx, iperf_port, "iperf")
        out["ready_iperf_s"] = round(wait_ready("iperf", public, a.ready_timeout, procs), 3)
        settle(a.settle)
        if procs:
            out["rss_before_iperf_kib"] = rss_kib([pid for p in procs for pid in p.tree()])
            out["rss_before_iperf_by_proc_kib"] = rss_by_proc(procs)
        peak_by_proc: dict[str, int] = {}
        for streams in (1, 8):
            pids = [pid for p in procs for pid in p.tree()]
            reset_peak_rss(pids)
            c0 = cpu_seconds(pids)
            r = iperf_client(public, seconds=a.seconds, streams=streams, timeout=a.seconds + 60)
            c1 = cpu_seconds(pids)
            if "error" not in r and procs:
                r["proxy_cpu_s"] = round(c1 - c0, 3)
                r["cpu_s_per_gb"] = (c1 - c0) / (r["bytes"] / 1e9)
                r["proxy_cpu_pct"] = 100 * (c1 - c0) / r["seconds"]
            if procs:
                # This run's own peak (VmHWM was reset before it), per process.
                r["rss_peak_by_proc_kib"] = rss_by_proc(procs, "VmHWM:")
                r["rss_peak_kib"] = sum(r["rss_peak_by_proc_kib"].values())
                for k, v in r["rss_peak_by_proc_kib"].items():
                    peak_by_proc[k] = max(peak_by_proc.get(k, 0), v)
            out[f"iperf_{streams}"] = r
            print(f"  {name}: iperf3 -P {streams}: "
                  + (f"{r['gbit_s']:.2f} Gbit/s" if "error" not in r else r["error"])
                  + (f", peak RSS {r['rss_peak_kib'] / 1024:.1f} MiB" if procs else ""), flush=True)
            settle(a.settle)
        if procs:
            # Peak of each process over both runs, and what is left once they
            # are over (after one settle pause).
            out["rss_peak_iperf_kib"] = sum(peak_by_proc.values())
            out["rss_after_iperf_kib"] = rss_kib([pid for p in procs for pid in p.tree()])
            out["rss_after_iperf_by_proc_kib"] = rss_by_proc(procs)
        reg.stop(procs)
        procs = []
        settle(a.settle)

        # ---- phase B: RSS, latency, half-close, connection rate, in front of echo
        public, procs = SETUP[name](ctx, echo_port, "echo")
        out["ready_echo_s"] = round(wait_ready("echo", public, a.ready_timeout, procs), 3)
        settle(a.settle)
        pids = [pid for p in procs for pid in p.tree()]
        out["rss_idle_kib"] = rss_kib(pids) if procs else None
        out["proxy_pids"] = {p.name: p.pid for p in procs}
        holder = reg.start(f"hold-{name}", [str(ctx.bins["rr"]), "-mode", "hold", "-addr",
                                             f"{HOST}:{public}", "-n", str(a.hold),
                                             "-timeout", "10s", "-hold", "300s"], stdin_pipe=True)
        try:
            line = holder.wait_line("READY", 120)
            hold = json.loads(line.split(None, 1)[1])
            settle(0.5)
            pids = [pid for p in procs for pid in p.tree()]
            if procs and hold["open"]:
                hold["rss_kib"] = rss_kib(pids)
                hold["rss_per_1000_kib"] = (hold["rss_kib"] - out["rss_idle_kib"]) * 1000 / hold["open"]
            out["hold"] = hold
        finally:
            reg.stop([holder])
        print(f"  {name}: hold {a.hold}: {out['hold']}", flush=True)
        settle(a.settle)
        out["rr"] = rr_tool(ctx, ["-mode", "rr", "-addr", f"{HOST}:{public}", "-n", str(a.rr_n),
                                  "-size", "64"], timeout=300)
        print(f"  {name}: rr: {out['rr']}", flush=True)
        settle(a.settle)
        if a.halfclose:
            out["halfclose"] = rr_tool(ctx, ["-mode", "halfclose", "-addr", f"{HOST}:{public}",
                                             "-n", str(a.halfclose), "-size", "262144",
                                             "-timeout", "2s", "-duration", "10s"], timeout=60)
            print(f"  {name}: half-close: {out['halfclose']}", flush=True)
            settle(a.settle)
        out["connect"] = rr_tool(ctx, ["-mode", "connect", "-addr", f"{HOST}:{public}",
                                       "-c", str(a.conn_workers), "-duration", f"{a.seconds}s",
                                       "-timeout", "5s"], timeout=a.seconds + 60)
        print(f"  {name}: connect: {out['connect']}", flush=True)
        pids = [pid for p in procs for pid in p.tree()]
        out["rss_end_kib"] = rss_kib(pids) if procs else None
    except Exception as exc:  # one broken target must not cost the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  {name}: ERROR {out['error']}", flush=True)
    finally:
        reg.stop(procs + servers)
    return out


def rr_tool(ctx: Ctx, args: list[str], timeout: float) -> dict:
    try:
        res = run_cmd([str(ctx.bins["rr"])] + args, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"rr {args[1]} timed out after {timeout}s"}
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"rr {args[1]} rc={res.returncode}: {res.stderr.strip()[-400:]}"}


# --------------------------------------------------------------------------- report

COLUMNS = [  # key, header, better ("hi"/"lo"), proxy-only
    ("g1", "1-stream Gbit/s", "hi", False),
    ("g8", "8-stream Gbit/s", "hi", False),
    ("p50", "RR p50 us", "lo", False),
    ("p99", "RR p99 us", "lo", False),
    ("cps", "conn/s", "hi", False),
    ("cpu", "CPU s/GB", "lo", True),
    ("rss", "RSS idle MiB", "lo", True),
    ("rss1k", "RSS per 1000 streams MiB", "lo", True),
    ("rsspk", "peak RSS under iperf MiB", "lo", True),
    ("pk8", "8-stream peak above idle MiB", "lo", True),
    ("rssaft", "RSS after iperf MiB", "lo", True),
]


def metrics(r: dict) -> dict:
    def get(*path):
        cur = r
        for k in path:
            if not isinstance(cur, dict) or k not in cur or (isinstance(cur[k], dict) and "error" in cur[k]):
                return None
            cur = cur[k]
        return cur

    m = {
        "g1": get("iperf_1", "gbit_s"), "g8": get("iperf_8", "gbit_s"),
        "p50": get("rr", "p50_us"), "p99": get("rr", "p99_us"),
        "cps": get("connect", "conn_per_s"),
        "cpu": get("iperf_1", "cpu_s_per_gb"),
        "rss": r["rss_idle_kib"] / 1024 if r.get("rss_idle_kib") else None,
        "rss1k": (get("hold", "rss_per_1000_kib") / 1024
                  if get("hold", "rss_per_1000_kib") is not None else None),
        "rsspk": r["rss_peak_iperf_kib"] / 1024 if r.get("rss_peak_iperf_kib") else None,
        "rssaft": r["rss_after_iperf_kib"] / 1024 if r.get("rss_after_iperf_kib") else None,
        "pk8": ((get("iperf_8", "rss_peak_kib") - r["rss_before_iperf_kib"]) / 1024
                if get("iperf_8", "rss_peak_kib") and r.get("rss_before_iperf_kib") else None),
    }
    return m


def fmt(v, key: str) -> str:
    if v is None:
        return "-"
    if key in ("p50", "p99", "cps"):
        return f"{v:,.0f}"
    if key in ("rss", "rss1k", "rsspk", "rssaft", "pk8"):
        return f"{v:.1f}"
    return f"{v:.2f}"


def median(values: list) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per target and metric: the median over repeats, plus min and max."""
    out = {}
    for t, rs in runs.items():
        per = [metrics(r) for r in rs]
        out[t] = {k: {"median": median([m[k] for m in per]),
                      "min": min((m[k] for m in per if m[k] is not None), default=None),
                      "max": max((m[k] for m in per if m[k] is not None), default=None)}
                  for k, _, _, _ in COLUMNS}
    return out


def tables(runs: dict[str, list[dict]]) -> str:
    summary = summarize(runs)
    ms = {t: {k: v["median"] for k, v in s.items()} for t, s in summary.items()}
    lines = ["| target | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for t, rs in runs.items():
        cells = [fmt(ms[t][k], k) if not (proxy_only and t == "direct") else "-"
                 for k, _, _, proxy_only in COLUMNS]
        failed = sum(1 for r in rs if r.get("error"))
        name = t + (f" ({failed}/{len(rs)} runs failed)" if failed else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    refs = [ref for ref in ("gotunnel", "haproxy") if ref in ms]
    if refs:
        lines += ["", "Ratios (target value / reference value; for Gbit/s and conn/s higher is "
                  "better, for the other columns lower is better):", "",
                  "| target / reference | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
                  "|---|" + "---:|" * len(COLUMNS)]
        for ref in refs:
            for t in runs:
                if t == ref or t == "direct":
                    continue
                cells = []
                for k, _, _, _ in COLUMNS:
                    a, b = ms[t][k], ms[ref][k]
                    cells.append(f"{a / b:.2f}x" if a is not None and b else "-")
                lines.append(f"| {t} / {ref} | " + " | ".join(cells) + " |")
    notes = []
    for t, rs in runs.items():
        for i, r in enumerate(rs):
            tag = f"{t}" + (f" (run {i + 1})" if len(rs) > 1 else "")
            if r.get("error"):
                notes.append(f"- {tag}: {r['error'].splitlines()[0]}")
            for key in ("iperf_1", "iperf_8", "rr", "connect", "halfclose"):
                if isinstance(r.get(key), dict) and "error" in r[key]:
                    notes.append(f"- {tag}: {key}: {r[key]['error']}")
            c = r.get("connect") or {}
            if c.get("failures"):
                notes.append(f"- {tag}: {c['failures']} failed connections in conn/s ({c.get('errors')})")
            before = r.get("rss_before_iperf_by_proc_kib") or {}
            peak8 = (r.get("iperf_8") or {}).get("rss_peak_by_proc_kib") or {}
            after = r.get("rss_after_iperf_by_proc_kib") or {}
            if peak8:
                notes.append(f"- {tag}: RSS MiB idle -> 8-stream peak -> after, per process: " + "; ".join(
                    f"{k} {before.get(k, 0) / 1024:.1f} -> {v / 1024:.1f} -> {after.get(k, 0) / 1024:.1f}"
                    for k, v in peak8.items()))
            h = r.get("hold") or {}
            if h.get("failures"):
                notes.append(f"- {tag}: {h['failures']} of the held connections failed")
        hcs = [r["halfclose"] for r in rs if isinstance(r.get("halfclose"), dict)
               and "error" not in r["halfclose"]]
        if hcs:
            tries = sum(h["tries"] for h in hcs)
            notes.append(f"- {t}: half-close probe: {sum(h['complete'] for h in hcs)}/{tries} complete "
                         f"256 KiB echoes after the client's FIN ({sum(h['truncated'] for h in hcs)} "
                         f"truncated, {sum(h['failures'] for h in hcs)} failed)")
    if len(next(iter(runs.values()), [])) > 1:
        notes.append("- figures are medians over repeats (min/max per metric in the JSON summary)")
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines)


def versions(ctx: Ctx, targets: list[str]) -> dict:
    def first(argv, env=None):
        try:
            res = run_cmd(argv, timeout=30, env=env)
            return (res.stdout or res.stderr).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable: {exc}"

    v = {
        "python": platform.python_version(),
        "go": first([gobuild.go_binary() or "go", "version"]),
        "haproxy": first(["haproxy", "-v"]).splitlines()[0],
        "iperf3": first(["iperf3", "--version"]).splitlines()[0],
        "yamux": "Debian golang-github-hashicorp-yamux-dev "
                 + first(["dpkg-query", "-W", "-f", "${Version}", "golang-github-hashicorp-yamux-dev"]),
    }
    for t in targets:
        if t.startswith("relayd"):
            v[t] = first([ctx.args.relayd, "version"], env=_relayd_env(t == "relayd-pure")).splitlines()
    return v


def machine() -> dict:
    cpu = ""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
            "cpu": cpu, "kernel": platform.release()}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma-separated, run in this order (default: {','.join(DEFAULT_TARGETS)}; "
                         f"also: haproxy-mt = nbthread nproc, gotunnel-p1 = GOMAXPROCS=1)")
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="duration of each iperf3 run and of the conn/s run (default 5)")
    ap.add_argument("--rr-n", type=int, default=20000, help="request/response round trips (default 20000)")
    ap.add_argument("--conn-workers", type=int, default=16, help="conn/s concurrent workers (default 16)")
    ap.add_argument("--hold", type=int, default=1000, help="idle connections held for RSS (default 1000)")
    ap.add_argument("--halfclose", type=int, default=20,
                    help="half-close probe tries, 0 to skip (default 20)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every target N times, interleaved; report medians (default 1)")
    ap.add_argument("--gomaxprocs", type=int, default=0,
                    help="GOMAXPROCS for the Go tunnel processes (default: Go's own, = nproc)")
    ap.add_argument("--haproxy-threads", type=int, default=1, help="HAProxy nbthread (default 1)")
    ap.add_argument("--relayd", default=str(REPO / ".venv" / "bin" / "relayd"), help="relayd executable")
    ap.add_argument("--relayd-metrics", action="store_true", help="start relayd serve with --metrics")
    ap.add_argument("--settle", type=float, default=1.0, help="pause between measurements, s (default 1)")
    ap.add_argument("--ready-timeout", type=float, default=60.0, help="path readiness deadline, s")
    ap.add_argument("--gocache", default=str(REPO / "bench" / "results" / ".gocache"),
                    help="Go build cache directory")
    ap.add_argument("--out", default=None, help="write the JSON results here")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    args = ap.parse_args(argv)
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.target_list if t not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown targets {bad}; choose from {ALL_TARGETS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    need_haproxy = any(t.startswith("haproxy") for t in args.target_list)
    for tool in ("iperf3",) + (("haproxy",) if need_haproxy else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (bench/tunnel/run.sh installs it)")

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="tunnelbench-"))
    reg = Registry(tmp)
    started = time.monotonic()
    try:
        print(f"building Go tools (cache {args.gocache}) ...", flush=True)
        bins = gobuild.build(tmp / "bin", cache_dir=pathlib.Path(args.gocache))
        ctx = Ctx(args, tmp, reg, bins)
        make_cert(ctx)
        info = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "machine": machine(),
            "versions": versions(ctx, args.target_list),
            "settings": {k: v for k, v in vars(args).items() if k != "target_list"},
        }
        print(f"nproc={info['machine']['nproc']}  temp dir {tmp}", flush=True)
        runs: dict[str, list[dict]] = {t: [] for t in args.target_list}
        first = True
        for rep in range(args.repeat):  # interleaved, so drift hits every target alike
            for name in args.target_list:
                if not first:
                    settle(2 * args.settle)
                first = False
                print(f"[{name}]" + (f" run {rep + 1}/{args.repeat}" if args.repeat > 1 else ""),
                      flush=True)
                t0 = time.monotonic()
                r = run_target(ctx, name)
                r["wall_s"] = round(time.monotonic() - t0, 1)
                runs[name].append(r)
        info["tls"] = {k[:-4]: v for k, v in ctx.info.items() if k.endswith("_tls")}
        info["wall_s"] = round(time.monotonic() - started, 1)
        table = tables(runs)
        print()
        print(f"nproc {info['machine']['nproc']}, {info['machine']['cpu']}; iperf3 {args.seconds:g} s, "
              f"RR n={args.rr_n} x 64 B, conn/s {args.conn_workers} workers, hold {args.hold}; "
              f"HAProxy nbthread {args.haproxy_threads}; GOMAXPROCS {args.gomaxprocs or 'default'}; "
              f"repeats {args.repeat}; wall {info['wall_s']} s")
        if info["tls"]:
            print("TLS on the agent link: " + "; ".join(f"{k} {v}" for k, v in info["tls"].items()))
        print()
        print(table)
        if args.out:
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**info, "summary": summarize(runs), "runs": runs, "table": table},
                                      indent=2) + "\n")
            print(f"\nJSON: {out}")
        return 1 if any(r.get("error") for rs in runs.values() for r in rs) else 0
    finally:
        reg.stop_all()
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
