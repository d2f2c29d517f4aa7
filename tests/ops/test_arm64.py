"""An ARM64 (Jetson-class) agent: relayd installed from the checkout into an
ARM64 Debian root file system and run there under qemu user-mode
emulation, against an x86-64 relay on this machine; and the container
image built for arm64 from the unchanged Dockerfile, its agent container
against the same kind of relay (the second test, tests/ops/images.py).

The rootfs is a minbase bookworm from debootstrap (--arch=arm64); inside it,
as on a board, Debian's python3, python3-dev and gcc, a venv, and relayd
built from a copy of the working tree with the exact versions of
requirements.lock (the Cython extensions compiled for aarch64). There
`relayd version` must say aarch64 and every hot module compiled. The relay
is this checkout's x86-64 build, on loopback; the chroot shares the host's
network, so the ARM64 agent enrolls with a join token, connects over mutual
TLS and serves an echo service through which a SHA-256-checked transfer
runs. ../shared/notes/arm64.md explains the set-up.

Slow (emulated apt, pip and C compiler: see docs/arm64.md for the last
run's time), so it runs only with RELAYD_ARM64=1:

    RELAYD_ARM64=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/ops/test_arm64.py

The rootfs gets /proc mounted and a copy of the sources; both go in a
finally, mounts first (remove_tree refuses to delete below a mount). The
relay and the agent are stopped by their PIDs. binfmt_misc is mounted and
qemu-aarch64 enabled if they were not: that is the machine's set-up, as the
qemu-user-static package makes it on a machine with systemd, and stays.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.ops.images import LIMITS, Podman, build_image
from tests.ops.rootfs import SCRATCH, debootstrap, need, remove_tree, run
from tests.ops.traffic import EchoService, transfer
from tests.tunnel.processes import Proc, cli, free_port, stop_pid, wait_agents_online, wait_port
from tests.waiting import until_sync

pytestmark = [
    pytest.mark.once,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(os.environ.get("RELAYD_ARM64") != "1",
                       reason="the ARM64 agent and image under qemu take 7-25 minutes each: RELAYD_ARM64=1 runs "
                              "them (the command and the last results in docs/arm64.md)"),
]

ROOT = Path(__file__).resolve().parents[2]
TRANSFER = 8 * 1024 * 1024
#: What a board needs to build relayd (the compiled core) from source.
BUILD_DEBS = ["ca-certificates", "gcc", "libc6-dev", "python3", "python3-dev", "python3-venv"]
#: What of the working tree the install needs (no host build: .so, generated C, caches).
SOURCES = ["pyproject.toml", "setup.py", "README.md", "requirements.lock", "relayd", "_ext"]
SKIP = shutil.ignore_patterns("*.so", "*.c", "__pycache__", "_*_c.py")


def binfmt_aarch64() -> None:
    """qemu-user-static's aarch64 handler registered with the kernel."""
    if not os.path.ismount("/proc/sys/fs/binfmt_misc"):
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], 30)
    if not os.path.exists("/proc/sys/fs/binfmt_misc/qemu-aarch64"):
        run(["update-binfmts", "--enable", "qemu-aarch64"], 30)
    with open("/proc/sys/fs/binfmt_misc/qemu-aarch64") as f:
        assert f.readline().strip() == "enabled", "the qemu-aarch64 binfmt handler is disabled"


def check_version(version: str) -> None:
    """`relayd version` of an ARM64 build: aarch64, and every hot module compiled."""
    print(version)
    assert "(CPython, aarch64)" in version, version
    for module in ("yamux", "wsframe", "h1proxy", "flowfilter"):
        assert f"relayd.core._{module}: compiled" in version, version


def start_relay(scratch: Path, procs: list) -> tuple[int, str]:
    """This checkout's x86-64 relay on loopback, its endpoint echo: (the
    endpoint's public port, a join token for it). The relay joins ``procs``."""
    agents, public = free_port(), free_port()
    procs.append(Proc(["serve", "--data", str(scratch / "relay"), "--agents", f"127.0.0.1:{agents}",
                       "--tcp", f"echo=127.0.0.1:{public}"]))
    wait_port(agents)
    return public, cli("admin", "join-token", "--data", str(scratch / "relay"), "--endpoint", "echo").stdout.strip()


def test_arm64_agent_under_qemu_against_an_x86_64_relay():
    need("debootstrap", "qemu-aarch64-static", "update-binfmts", "chroot",
         packages="debootstrap qemu-user-static binfmt-support")
    binfmt_aarch64()
    scratch = Path(tempfile.mkdtemp(prefix="relayd-arm64-", dir=SCRATCH))
    rootfs = scratch / "rootfs"
    timings: dict[str, float] = {}
    procs: list = []
    t_all = time.monotonic()
    try:
        timings["debootstrap"] = debootstrap(rootfs, scratch / "debootstrap.log", arch="arm64", timeout=1800)
        assert run(["chroot", str(rootfs), "uname", "-m"], 60).stdout.decode().strip() == "aarch64"
        shutil.copyfile("/etc/resolv.conf", rootfs / "etc/resolv.conf")
        bundle = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(bundle):  # trust what the host trusts (a TLS-inspecting egress), as test_container does
            (rootfs / "usr/local/share/ca-certificates").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, rootfs / "usr/local/share/ca-certificates/host-trust.crt")
        run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], 30)

        def inside(script: str, timeout: float, what: str) -> subprocess.CompletedProcess:
            t0 = time.monotonic()
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                   "DEBIAN_FRONTEND": "noninteractive", "PIP_NO_CACHE_DIR": "1",
                   "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_CONSTRAINT": "/src/requirements.lock"}
            res = run(["chroot", str(rootfs), "/bin/sh", "-ec", script], timeout, scratch / f"{what}.log", env=env)
            timings[what] = time.monotonic() - t0
            return res

        inside(f"apt-get update -q && apt-get install -y -q --no-install-recommends {' '.join(BUILD_DEBS)}",
               2400, "apt")
        for name in SOURCES:
            src, dst = ROOT / name, rootfs / "src" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, ignore=SKIP) if src.is_dir() else shutil.copyfile(src, dst)
        inside("python3 -m venv /opt/relayd && /opt/relayd/bin/pip install -q pip setuptools wheel cython", 1200,
               "venv")
        # As the Dockerfile does: build_ext's -j through distutils' extra config, no debug info.
        inside("cd /src && printf '[build_ext]\\nparallel = %s\\n' \"$(nproc)\" > /tmp/build_ext.cfg"
               " && DIST_EXTRA_CONFIG=/tmp/build_ext.cfg CFLAGS=-g0 /opt/relayd/bin/pip install -q --no-build-isolation .",
               3600, "install")
        check_version(run(["chroot", str(rootfs), "/opt/relayd/bin/relayd", "version"], 300).stdout.decode())

        t0 = time.monotonic()
        public, token = start_relay(scratch, procs)
        with EchoService() as echo:
            with open(scratch / "agent.log", "wb") as out:
                agent = subprocess.Popen([shutil.which("chroot"), str(rootfs), "/opt/relayd/bin/relayd", "agent",
                                          "--data", "/var/lib/relayd-agent", "--join", token,
                                          "--endpoint", f"echo=127.0.0.1:{echo.port}"],
                                         stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
            procs.append(agent)
            # chroot execs relayd: this PID is the agent, run by the kernel through qemu's aarch64 handler.
            exe = until_sync(lambda: not os.readlink(f"/proc/{agent.pid}/exe").endswith("/chroot")
                             and os.readlink(f"/proc/{agent.pid}/exe"), 30, "chroot did not exec the agent")
            assert "qemu" in exe or "aarch64" in exe, exe
            try:
                wait_agents_online(scratch / "relay", 1, timeout=180)
            except AssertionError:
                raise AssertionError((scratch / "agent.log").read_text(errors="replace")[-3000:]) from None
            result = transfer(public, TRANSFER, timeout=300)
            assert result["ok"], f"the transfer through the ARM64 agent did not arrive intact: {result}"
            print(f"{TRANSFER >> 20} MiB through the ARM64 agent in {result['seconds']:.1f}s")
            stop_pid(agent, grace=30)
            assert agent.returncode == 0, (scratch / "agent.log").read_text(errors="replace")[-3000:]
        timings["traffic"] = time.monotonic() - t0
    finally:
        for p in reversed(procs):
            p.stop() if isinstance(p, Proc) else stop_pid(p)
        remove_tree(scratch)
        timings["total"] = time.monotonic() - t_all
        print("seconds:", {k: round(v, 1) for k, v in timings.items()})


def test_arm64_image_runs_an_agent_against_an_x86_64_relay():
    """The Dockerfile, unchanged, built for arm64 (linux/arm64, as a Jetson
    board runs it) on an arm64 slim base under qemu: the image says aarch64
    with the compiled core, and an agent container from it serves an x86-64
    relay (this checkout's build) through which a SHA-256-checked transfer
    runs; stopping the container is a clean exit of relayd."""
    need("podman", "runc", "debootstrap", "qemu-aarch64-static", "update-binfmts",
         packages="podman runc debootstrap qemu-user-static binfmt-support")
    binfmt_aarch64()  # with flag F: the handler works inside the build's and the run's containers
    scratch = Path(tempfile.mkdtemp(prefix="relayd-arm64-image-", dir=SCRATCH))
    podman = Podman(scratch)
    tag = f"localhost/relayd-test-arm64:{uuid.uuid4().hex[:8]}"
    agent = f"relayd-test-arm64-agent-{tag[-8:]}"
    procs: list[Proc] = []
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    try:
        timings.update(build_image(podman, scratch, tag, arch="arm64"))
        meta = json.loads(podman.out("image", "inspect", tag))[0]
        assert (meta["Os"], meta["Architecture"]) == ("linux", "arm64"), (meta["Os"], meta["Architecture"])
        print(f"arm64 image {int(meta['Size']) / 1e6:.1f} MB")
        check_version(podman.out("run", "--rm", "--network", "host", "--no-healthcheck", *LIMITS, tag, "version",
                                 timeout=300))

        t0 = time.monotonic()
        public, token = start_relay(scratch, procs)
        with EchoService() as echo:
            podman("run", "-d", "--name", agent, "--network", "host", "--no-healthcheck", *LIMITS,
                   "-v", f"{agent}:/var/lib/relayd", tag, "agent", "--data", "/var/lib/relayd", "--join", token,
                   "--endpoint", f"echo=127.0.0.1:{echo.port}")
            try:
                wait_agents_online(scratch / "relay", 1, timeout=180)
            except AssertionError:
                raise AssertionError(podman.logs(agent)) from None
            result = transfer(public, TRANSFER, timeout=300)
            assert result["ok"], f"the transfer through the arm64 agent container did not arrive intact: {result}"
            print(f"{TRANSFER >> 20} MiB through the arm64 agent container in {result['seconds']:.1f}s")
            podman("stop", "--time", "30", agent, timeout=90)
            assert podman.out("inspect", "--format", "{{.State.ExitCode}}", agent) == "0", podman.logs(agent)
        timings["traffic"] = time.monotonic() - t0
    finally:
        for p in procs:
            p.stop()
        for args in (["rm", "-a", "-f", "-v", "-t", "0"], ["volume", "prune", "-f"], ["rmi", "-a", "-f"]):
            subprocess.run(podman.cmd + args, capture_output=True, timeout=120)
        remove_tree(scratch)
        timings["total"] = time.monotonic() - t_all
        print("seconds:", {k: round(v, 1) for k, v in timings.items()})
