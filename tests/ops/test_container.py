"""The container image (Dockerfile at the root), built and run for real.

The image is built as tests/ops/images.py says (a debootstrapped slim base
under the name the Dockerfile starts FROM; podman builds the Dockerfile
unchanged on it). The first test runs a relay container and an agent
container from the image (host network, loopback ports) and carries a
SHA-256-checked transfer through the tunnel. It also checks the image's
HEALTHCHECK turns healthy, that both processes run as the image's
unprivileged user, that a stop is a clean exit of PID 1, and reports the
image's size.

The same image, with Debian's systemd added, then boots as three hosts with
systemd as PID 1 and runs configs/systemd's units as a server would (the
second test; docs/operations.md "Tested under systemd"). The image is built
once for both.

Everything podman makes lives in the test's own storage root, removed with
its scratch folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from relayd.control.jointoken import JoinToken
from tests.ops.images import BASE, LIMITS, Podman, build_image
from tests.ops.rootfs import SCRATCH, need, remove_tree
from tests.ops.traffic import EchoService, transfer
from tests.tunnel.processes import free_port
from tests.waiting import listening, until_sync

pytestmark = [pytest.mark.once, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
#: The image's user (Dockerfile: useradd --uid 10001).
UID = 10001
#: What the image may add to its base (Python, the venv): a regression guard, not a target.
MAX_ADDED = 120 * 1024 * 1024
TRANSFER = 32 * 1024 * 1024

def process_uids(podman: Podman, name: str) -> set[int]:
    """The real, effective, saved and file-system uids of a container's PID 1, read on the host."""
    pid = int(podman.out("inspect", "--format", "{{.State.Pid}}", name))
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Uid:"))
    return {int(u) for u in line.split()[1:]}


class Image:
    """The image built from the Dockerfile, in the module's own podman storage."""

    def __init__(self, podman: Podman, tag: str, scratch: Path) -> None:
        self.podman, self.tag, self.scratch = podman, tag, scratch


@pytest.fixture(scope="module")
def image():
    """Build the base (debootstrap, trimmed as slim) and the Dockerfile once for the module's tests."""
    need("podman", "runc", "debootstrap", packages="podman runc debootstrap")
    scratch = Path(tempfile.mkdtemp(prefix="relayd-image-", dir=SCRATCH))
    podman = Podman(scratch)
    tag = f"localhost/relayd-test:{uuid.uuid4().hex[:8]}"
    try:
        timings = build_image(podman, scratch, tag)
        print("seconds:", {k: round(v, 1) for k, v in timings.items()})
        yield Image(podman, tag, scratch)
    finally:
        for args in (["rm", "-a", "-f", "-v", "-t", "0"], ["volume", "prune", "-f"], ["rmi", "-a", "-f"]):
            subprocess.run(podman.cmd + args, capture_output=True, timeout=120)
        remove_tree(scratch)


def test_image_builds_runs_a_relay_and_an_agent_and_carries_traffic(image):
    podman, tag = image.podman, image.tag
    relay, agent = f"relayd-test-relay-{tag[-8:]}", f"relayd-test-agent-{tag[-8:]}"
    t0 = time.monotonic()
    try:
        size = int(podman.out("image", "inspect", "--format", "{{.Size}}", tag))
        base = int(podman.out("image", "inspect", "--format", "{{.Size}}", BASE))
        print(f"image {size / 1e6:.1f} MB ({(size - base) / 1e6:.1f} MB over the base's {base / 1e6:.1f} MB)")
        assert size - base < MAX_ADDED, f"the image adds {(size - base) / 1e6:.1f} MB to its base"
        meta = json.loads(podman.out("image", "inspect", tag))[0]
        assert meta["Config"]["User"] == "relayd" and "/var/lib/relayd" in meta["Config"]["Volumes"]
        assert meta["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "relayd.healthcheck"]

        version = podman.out("run", "--rm", "--network", "host", "--no-healthcheck", *LIMITS, tag, "version")
        for module in ("yamux", "wsframe", "h1proxy", "flowfilter"):
            assert f"relayd.core._{module}: compiled" in version, version

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
            result = transfer(public, TRANSFER)
            assert result["ok"], f"the transfer through the containers' tunnel did not arrive intact: {result}"
            print(f"{TRANSFER >> 20} MiB through the tunnel in {result['seconds']:.2f}s")

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
    finally:
        for args in (["rm", "-f", "-t", "0", relay, agent], ["volume", "rm", "-f", relay, agent]):
            subprocess.run(podman.cmd + args, capture_output=True, timeout=120)
        print(f"ran in {time.monotonic() - t0:.1f}s")


#: The image with systemd as PID 1: relayd's units run in it as on a server (configs/systemd).
SYSTEMD_CONTAINERFILE = """\
FROM {tag}
USER root
RUN apt-get update \\
 && apt-get install -y --no-install-recommends systemd systemd-sysv \\
 && apt-get clean && rm -rf /var/lib/apt/lists/*
HEALTHCHECK NONE
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/lib/systemd/systemd"]
CMD []
"""
PROBE = "/root/src/traffic.py"  # tests/ops/traffic.py, in each checkout


def install_lines(unit: str) -> list[str]:
    """The install commands of a unit's header comment ("#   " lines after
    "# Install" up to the first empty comment line), but the one that makes
    /opt/relayd: the image holds that, built from this checkout."""
    lines = (CONFIGS / "systemd" / unit).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Install"))
    block = [line[4:] for line in lines[start + 1:lines.index("#", start)] if line.startswith("#   ")]
    venv = [line for line in block if "pip install" in line]
    assert len(venv) == 1 and block[-1].endswith(f"systemctl enable --now {unit.removesuffix('.service')}"), block
    return [line for line in block if line not in venv]


def journal_records(text: str) -> list[dict]:
    """relayd's JSON log lines in a journal (systemd's own lines are text)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class Machine:
    """A container booted with systemd: one host of a deployment."""

    def __init__(self, podman: Podman, name: str) -> None:
        self.podman, self.name = podman, name

    def sh(self, script: str, timeout: float = 120) -> str:
        return self.podman.out("exec", self.name, "sh", "-c", script, timeout=timeout)

    def try_sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.podman.cmd + ["exec", self.name, "sh", "-c", script], capture_output=True,
                              text=True, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines())

    def journal(self, unit: str) -> str:
        return self.try_sh(f"journalctl -u {unit} -o cat --no-pager").stdout

    def boot(self, image: str, network: str) -> None:
        # --privileged: systemd in the container sets up each unit's sandbox
        # (mount and user namespaces, seccomp) as it would on a host.
        self.podman("run", "-d", "--name", self.name, "--network", network, "--privileged", "--systemd=always",
                    *LIMITS, image)
        state = until_sync(lambda: self.try_sh("systemctl is-system-running --wait", 120).stdout.strip() or None,
                           150, "systemd did not finish booting")
        assert state in ("running", "degraded"), state

    def install(self, stage: Path, unit: str) -> None:
        """The unit's own install steps, one by one, as root in a checkout (``stage``)."""
        self.podman("cp", f"{stage}/.", f"{self.name}:/root/src")
        for line in install_lines(unit):
            res = self.try_sh(f"set -e; cd /root/src; {line}")
            assert res.returncode == 0, f"{unit}'s install step failed: {line}\n{res.stdout}{res.stderr}"

    def sandbox(self, unit: str, user: str) -> dict[str, str]:
        """What the kernel says of a unit's main process: ids, capabilities, seccomp."""
        pid = self.show(unit, "MainPID")["MainPID"]
        assert pid != "0", f"{unit} has no main process:\n{self.journal(unit)[-2000:]}"
        status = dict(line.split(":\t", 1) for line in self.sh(f"cat /proc/{pid}/status").splitlines()
                      if ":\t" in line)
        status["pid"], status["uid_of_user"] = pid, self.sh(f"id -u {user}")
        return status


def test_systemd_units_run_the_relay_and_the_agent_hardened(image):
    """configs/systemd under a real systemd: three containers booted with
    systemd as PID 1 (the relay's host, an agent's and a device's, sharing
    one private network namespace with nothing but loopback) run the units'
    own install lines in a checkout of configs/ with only the edits the
    comments ask for (the relay's public address; the agent's join token, the
    device's OTP, EST address and pin, in their configs for the first start),
    and then: the agent and the device enroll and come online; a
    SHA-256-checked transfer keeps going across `systemctl reload relayd`
    (which starts a new endpoint); each main process runs as its dedicated
    user with no new privileges, a seccomp filter and only the capability its
    unit grants (the relay binds 443 with it), and can write its data
    directory but not /etc; a killed agent is restarted and comes back;
    `systemctl stop` is a clean exit 0 for each; a configuration error (exit
    status 2) is not restarted; no journal holds the join token or the OTP."""
    podman, tag = image.podman, image.tag
    work = image.scratch / "systemd"
    (work / "build").mkdir(parents=True)
    (work / "build" / "Containerfile").write_text(SYSTEMD_CONTAINERFILE.format(tag=tag))
    sdtag = tag + "-systemd"
    podman("build", "--format", "docker", "--layers=false", "--network", "host", *LIMITS, "-t", sdtag,
           str(work / "build"), timeout=600, log=work / "build.log")
    suffix = tag[-8:]
    relay, agent, device = (Machine(podman, f"relayd-sd-{role}-{suffix}") for role in ("relay", "agent", "device"))
    t0 = time.monotonic()
    try:
        # Each host gets a checkout's configs/ (the example configs with the
        # edit their comments ask for) and runs the unit's install lines in it.
        def checkout(name: str, config: str, old: str, new: str) -> Path:
            stage = work / name
            shutil.copytree(CONFIGS, stage / "configs")
            text = (CONFIGS / config).read_text()
            assert old in text, f"configs/{config} no longer has {old!r}"
            (stage / "configs" / config).write_text(text.replace(old, new))
            shutil.copy(Path(__file__).with_name("traffic.py"), stage)
            return stage

        # The relay's host: the example as shipped, but for the address that join tokens carry.
        relay.boot(sdtag, "none")
        relay.install(checkout("relay", "relay.toml", 'public = "relay.example.com:7000"', 'public = "127.0.0.1:7000"'),
                      "relayd.service")
        admin = "runuser -u relayd -- /opt/relayd/bin/relayd admin {} --data /var/lib/relayd"
        token = until_sync(lambda: relay.try_sh(admin.format("join-token --ttl 10m")).stdout.strip() or None, 60,
                           lambda: "no join token from the relay:\n" + relay.journal("relayd")[-3000:],
                           interval=0.5)
        secret = JoinToken.decode(token).secret

        # The agent's host, on the relay's loopback: the agent with the token
        # in its config, and its local service (the example's endpoint db).
        agent.boot(sdtag, f"container:{relay.name}")
        agent.install(checkout("agent", "agent.toml", '# join = "relayd1...."', f'join = "{token}"'),
                      "relayd-agent.service")
        agent.sh(f"systemd-run --unit relayd-test-echo python3 {PROBE} echo 5432")

        def online() -> bool:
            return " online " in relay.try_sh(admin.format("agents")).stdout

        until_sync(online, 60, lambda: "the agent did not come online:\n" + agent.journal("relayd-agent")[-3000:],
                   interval=0.5)

        # An edge device, on the same loopback: the unit's install lines with
        # configs/device-agent.toml as agent.toml, and a provisioning OTP in it.
        otp = json.loads(relay.sh(admin.format("otp create --name cam-01 --json")))
        keys = f'[agent]\notp = "{otp["otp"]}"\nest = "https://127.0.0.1"\npin = "{otp["ca_sha256"]}"\n'
        stage = checkout("device", "device-agent.toml", "[agent]\n", keys)
        shutil.copy(stage / "configs/device-agent.toml", stage / "configs/agent.toml")
        device.boot(sdtag, f"container:{relay.name}")
        device.install(stage, "relayd-agent.service")
        (dev_id,) = until_sync(lambda: [line.split()[0] for line in relay.try_sh(admin.format("agents")).stdout
                                        .splitlines() if line.startswith("dv-") and " online " in line], 60,
                               lambda: "the device did not come online:\n" + device.journal("relayd-agent")[-3000:],
                               interval=0.5)
        assert "cam-01 (unclaimed)" in relay.sh(admin.format(f"agents {dev_id}"))

        # A transfer through the public port db, with a reload half-way that starts a new endpoint.
        relay.sh('sed -i "s/^db = \\"0.0.0.0:15432\\"$/&\\nspare = \\"0.0.0.0:15433\\"/" /etc/relayd/relay.toml'
                 ' && grep -q "^spare = " /etc/relayd/relay.toml')
        result = json.loads(relay.sh(f"python3 {PROBE} transfer 15432 {16 << 20} systemctl reload relayd",
                                     timeout=180))
        assert result["ok"] and result["midway_rc"] == 0, result
        until_sync(lambda: any(r["msg"] == "reload: endpoint listening" and r.get("endpoint") == "spare"
                               for r in journal_records(relay.journal("relayd"))), 20,
                   lambda: "the reload did not start the new endpoint:\n" + relay.journal("relayd")[-3000:])
        print(f"16 MiB through the tunnel across a reload in {result['seconds']}s")

        # The sandbox, read from the kernel.
        for host, unit, user, caps in ((relay, "relayd", "relayd", 1 << 10), (agent, "relayd-agent", "relayd-agent", 0)):
            st = host.sandbox(unit, user)
            assert set(st["Uid"].split()) == {st["uid_of_user"]} != {"0"}, (unit, st["Uid"])
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", (unit, st["NoNewPrivs"], st["Seccomp"])
            assert int(st["CapEff"], 16) == caps and int(st["CapBnd"], 16) == caps, (unit, st["CapEff"], st["CapBnd"])
            ns = f"nsenter -t {st['pid']} -m"
            bad = host.try_sh(f"{ns} touch /etc/relayd-written")
            assert bad.returncode != 0 and "Read-only file system" in bad.stderr, (unit, bad.stderr)
            host.sh(f"{ns} sh -c 'touch /var/lib/{user}/probe && rm /var/lib/{user}/probe'")
            score = host.sh(f"systemd-analyze security {unit} --no-pager | tail -1")
            print(unit, score.strip())
        relay.sh("python3 -c \"import socket; socket.create_connection(('127.0.0.1', 443), 5).close()\"")

        # A crash is restarted (RestartSec=5s), and the agent comes back with its identity.
        agent.sh("systemctl kill --signal=SIGKILL relayd-agent")
        until_sync(lambda: agent.show("relayd-agent", "NRestarts", "ActiveState") ==
                   {"NRestarts": "1", "ActiveState": "active"}, 30, "the killed agent was not restarted")
        until_sync(online, 60, "the restarted agent did not come back online", interval=0.5)
        result = json.loads(relay.sh(f"python3 {PROBE} transfer 15432 {4 << 20}", timeout=120))
        assert result["ok"], result

        # The token never reaches a journal (the agent's config holds it until it is enrolled).
        for host, unit in ((relay, "relayd"), (agent, "relayd-agent"), (device, "relayd-agent")):
            journal = host.journal(unit)
            assert token not in journal and secret not in journal, f"{host.name}'s journal has the join token"
            assert otp["otp"] not in journal, f"{host.name}'s journal has the OTP"

        # A stop is SIGTERM, GoAway and a clean exit.
        for host, unit in ((device, "relayd-agent"), (agent, "relayd-agent"), (relay, "relayd")):
            host.sh(f"systemctl stop {unit}", timeout=60)
            assert host.show(unit, "Result", "ExecMainStatus", "ActiveState") == {
                "Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}, host.journal(unit)[-3000:]

        # A configuration error exits 2, names the key, and is not restarted.
        relay.sh("sed -i '1i nonsense = 1' /etc/relayd/relay.toml && systemctl start relayd")
        until_sync(lambda: relay.show("relayd", "ActiveState")["ActiveState"] == "failed", 30,
                   "the relay with a bad config did not fail")
        time.sleep(3)  # longer than RestartSec=2s
        assert relay.show("relayd", "ActiveState", "ExecMainStatus", "NRestarts") == {
            "ActiveState": "failed", "ExecMainStatus": "2", "NRestarts": "0"}
        assert "nonsense" in relay.journal("relayd")
    finally:
        for args in (["rm", "-f", "-v", "-t", "0", device.name, agent.name, relay.name], ["rmi", "-f", sdtag]):
            subprocess.run(podman.cmd + args, capture_output=True, timeout=120)
        print(f"systemd test ran in {time.monotonic() - t0:.1f}s")
