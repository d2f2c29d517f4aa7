"""relayd as people run it: `relayd serve`, `relayd agent` and `relayd admin`
processes on loopback, stopped by PID (for the CLI tests and the
adversarial suite)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile

from tests.waiting import listening, until_sync

RELAYD = [sys.executable, "-m", "relayd.cli"]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop_pid(p: subprocess.Popen, grace: float = 10) -> None:
    """Stop a process this test started, by its PID: SIGTERM, then SIGKILL
    after ``grace`` seconds."""
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


class Proc:
    def __init__(self, args, **kw):
        # Output goes to temp files: an undrained pipe would block the process.
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(RELAYD + args, stdout=self.out, stderr=self.err, **kw)

    def stop(self):
        stop_pid(self.p)
        self.out.seek(0)
        self.err.seek(0)
        return self.out.read().decode(), self.err.read().decode()

    def rss(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


def cli(*args, check=True):
    res = subprocess.run(RELAYD + list(args), capture_output=True, text=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def wait_port(port, timeout=15):
    until_sync(lambda: listening(port), timeout, f"port {port} did not open")


def wait_agents_online(data, n, timeout=15):
    def online():
        out = cli("admin", "agents", "--data", str(data)).stdout
        return out if out.count(" online ") >= n else None

    return until_sync(online, timeout, lambda: "agents not online:\n" + cli("admin", "agents", "--data", str(data)).stdout,
                      interval=0.2)
