"""The container image (Dockerfile at the root), built and run for real.

No registry is reachable here, so the test makes the base image the
Dockerfile names: a minbase bookworm from debootstrap, trimmed as Debian's
slim images are (no docs, man pages, locales, apt lists or caches), imported
as docker.io/library/debian:bookworm-slim. podman builds the Dockerfile
unchanged on it, then runs a relay container and an agent container from the
image (host network, loopback ports) and carries a SHA-256-checked transfer
through the tunnel. It also checks the image's HEALTHCHECK turns healthy,
that both processes run as the image's unprivileged user, that a stop is a
clean exit of PID 1, and reports the image's size.

Everything podman makes lives in the test's own storage root (--root,
--runroot under one scratch folder), so removing that folder removes all of
it and nothing else; the rootfs goes with it. ../shared/notes/containers.md
(the podman flags this machine needs) explains the set-up.

The build reaches Debian and PyPI through the host's network. The base image
trusts what the host trusts (its CA bundle goes to
/usr/local/share/ca-certificates), so that a TLS-inspecting egress the host
is configured for works inside the build too; a plain host adds nothing.
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

from tests.ops.rootfs import MIRROR, SCRATCH, EchoService, debootstrap, need, remove_tree, run, transfer_ok
from tests.tunnel.processes import free_port
from tests.waiting import listening, until_sync

pytestmark = [pytest.mark.once, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
BASE = "docker.io/library/debian:bookworm-slim"
#: The limits podman's defaults exceed on this machine (containers.md).
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
#: The image's user (Dockerfile: useradd --uid 10001).
UID = 10001
#: What the image may add to its base (Python, the venv): a regression guard, not a target.
MAX_ADDED = 120 * 1024 * 1024
TRANSFER = 32 * 1024 * 1024

#: dpkg leaves these out, as Debian's slim images do (the build's own packages too).
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
"""
#: apt drops downloaded packages after installing, as in Debian's images.
APT_CLEAN = 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\n'
SOURCES = """\
Types: deb
URIs: {mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def slim(rootfs: Path, mirror: str) -> None:
    """Trim a minbase to what Debian's slim image holds, and trust the host's CAs."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(DPKG_SLIM)
    (rootfs / "etc/apt/apt.conf.d/clean").write_text(APT_CLEAN)
    (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
    (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(SOURCES.format(mirror=mirror))
    for sub in ("usr/share/man", "usr/share/info", "usr/share/lintian", "var/lib/apt/lists", "var/log"):
        for p in (rootfs / sub).glob("*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (rootfs / "usr/share/locale").glob("*"):
        if p.name != "locale.alias":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in sorted((rootfs / "usr/share/doc").rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        elif p.name != "copyright":
            p.unlink()
    for p in list((rootfs / "var/cache/apt").glob("*.bin")) + list((rootfs / "var/cache/apt/archives").glob("*.deb")):
        p.unlink()
    bundle = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(bundle):
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle, dest / "host-trust.crt")


class Podman:
    """podman with this machine's flags and a storage root of the test's own."""

    def __init__(self, scratch: Path) -> None:
        self.cmd = ["podman", "--root", str(scratch / "storage"), "--runroot", str(scratch / "run"),
                    "--runtime", "runc", "--cgroup-manager", "cgroupfs"]

    def __call__(self, *args: str, timeout: float = 120, **kw):
        return run(self.cmd + list(args), timeout, **kw)

    def out(self, *args: str, timeout: float = 120) -> str:
        return self(*args, timeout=timeout).stdout.decode().strip()

    def logs(self, name: str) -> str:
        res = subprocess.run(self.cmd + ["logs", "--tail", "40", name], capture_output=True, timeout=30)
        return (res.stdout + res.stderr).decode(errors="replace")


def process_uids(podman: Podman, name: str) -> set[int]:
    """The real, effective, saved and file-system uids of a container's PID 1, read on the host."""
    pid = int(podman.out("inspect", "--format", "{{.State.Pid}}", name))
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


def test_image_builds_runs_a_relay_and_an_agent_and_carries_traffic():
    need("podman", "runc", "debootstrap", packages="podman runc debootstrap")
    scratch = Path(tempfile.mkdtemp(prefix="relayd-image-", dir=SCRATCH))
    podman = Podman(scratch)
    tag = f"localhost/relayd-test:{uuid.uuid4().hex[:8]}"
    relay, agent = f"relayd-test-relay-{tag[-8:]}", f"relayd-test-agent-{tag[-8:]}"
    timings: dict[str, float] = {}
    try:
        timings["debootstrap"] = debootstrap(scratch / "rootfs", scratch / "debootstrap.log")
        slim(scratch / "rootfs", MIRROR)
        t0 = time.monotonic()
        tar = run(["tar", "-C", str(scratch / "rootfs"), "-c", "."], 300).stdout
        podman("import", "-", BASE, input=tar, timeout=300)
        del tar
        remove_tree(scratch / "rootfs")
        timings["import"] = time.monotonic() - t0

        t0 = time.monotonic()
        # docker format: OCI images have no HEALTHCHECK; --layers=false: one
        # layer per stage, nothing cached between runs; --jobs 2: both stages' apt steps at once.
        podman("build", "--format", "docker", "--layers=false", "--jobs", "2", "--network", "host", *LIMITS,
               "-t", tag, str(ROOT), timeout=1200, log=scratch / "build.log")
        timings["build"] = time.monotonic() - t0
        size = int(podman.out("image", "inspect", "--format", "{{.Size}}", tag))
        base = int(podman.out("image", "inspect", "--format", "{{.Size}}", BASE))
        print(f"image {size / 1e6:.1f} MB ({(size - base) / 1e6:.1f} MB over the base's {base / 1e6:.1f} MB)")
        assert size - base < MAX_ADDED, f"the image adds {(size - base) / 1e6:.1f} MB to its base"
        image = json.loads(podman.out("image", "inspect", tag))[0]
        assert image["Config"]["User"] == "relayd" and "/var/lib/relayd" in image["Config"]["Volumes"]
        assert image["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "relayd.healthcheck"]

        version = podman.out("run", "--rm", "--network", "host", "--no-healthcheck", *LIMITS, tag, "version")
        for module in ("yamux", "wsframe", "h1proxy", "flowfilter"):
            assert f"relayd.core._{module}: compiled" in version, version

        t0 = time.monotonic()
        agents, public, metrics = free_port(), free_port(), free_port()
        podman("run", "-d", "--name", relay, "--network", "host", *LIMITS, "-v", f"{relay}:/var/lib/relayd",
               "-e", f"RELAYD_HEALTH_URL=http://127.0.0.1:{metrics}/healthz",
               tag, "serve", "--data", "/var/lib/relayd", "--agents", f"127.0.0.1:{agents}",
               "--tcp", f"echo=127.0.0.1:{public}", "--metrics", f"127.0.0.1:{metrics}")
        until_sync(lambda: listening(agents), 60, lambda: "the relay container did not listen:\n" + podman.logs(relay))
        token = podman.out("exec", relay, "relayd", "admin", "join-token", "--data", "/var/lib/relayd",
                           "--endpoint", "echo", "--ttl", "10m")
        assert token.startswith("relayd1") and "\n" not in token
        with EchoService() as echo:
            podman("run", "-d", "--name", agent, "--network", "host", "--no-healthcheck", *LIMITS,
                   "-v", f"{agent}:/var/lib/relayd", tag, "agent", "--data", "/var/lib/relayd",
                   "--join", token, "--endpoint", f"echo=127.0.0.1:{echo.port}")
            until_sync(lambda: " online " in podman.out("exec", relay, "relayd", "admin", "agents", "--data",
                                                        "/var/lib/relayd"),
                       60, lambda: "the agent did not come online:\n" + podman.logs(agent), interval=0.5)
            ok, seconds = transfer_ok(public, TRANSFER)
            assert ok, "the transfer through the containers' tunnel did not arrive intact"
            print(f"{TRANSFER >> 20} MiB through the tunnel in {seconds:.2f}s")

            # The image's own HEALTHCHECK, run by podman (no systemd timer here, so on demand).
            def healthy():
                return subprocess.run(podman.cmd + ["healthcheck", "run", relay], capture_output=True,
                                      timeout=60).returncode == 0

            until_sync(healthy, 60, lambda: "the relay's health check did not pass:\n" + podman.logs(relay),
                       interval=1)
            health = json.loads(podman.out("inspect", relay))[0]["State"]
            assert (health.get("Health") or health.get("Healthcheck"))["Status"] == "healthy"

            assert process_uids(podman, relay) == {UID} and process_uids(podman, agent) == {UID}
            for name in (agent, relay):  # SIGTERM to PID 1: relayd drains and exits 0
                podman("stop", "--time", "20", name, timeout=60)
                assert podman.out("inspect", "--format", "{{.State.ExitCode}}", name) == "0", podman.logs(name)
        timings["run"] = time.monotonic() - t0
    finally:
        for args in (["rm", "-f", "-t", "0", relay, agent], ["volume", "rm", "-f", relay, agent],
                     ["rmi", "-a", "-f"]):
            subprocess.run(podman.cmd + args, capture_output=True, timeout=120)
        remove_tree(scratch)
        print("seconds:", {k: round(v, 1) for k, v in timings.items()})
