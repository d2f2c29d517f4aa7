"""Debian root file systems made by debootstrap for the operations tests (the
container image's base, an ARM64 board under qemu), removed without ever
reaching through a mount (the traffic those tests carry is in
tests/ops/traffic.py).

The tests need root (debootstrap, mount, podman's storage): each skips with
the reason when it cannot run here; scripts/test.sh installs the packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SUITE = "bookworm"
MIRROR = os.environ.get("RELAYD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
#: Where the test's scratch folders go (a disk, not a tmpfs: a root file system is a few hundred MB).
SCRATCH = Path(os.environ.get("RELAYD_OPS_SCRATCH", "/var/tmp"))


def need(*tools: str, packages: str) -> None:
    """Skip with the reason unless root and every tool is here."""
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, mount, podman storage)")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian packages {packages}; scripts/test.sh installs them)")


def run(cmd: list[str], timeout: float, log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion within ``timeout``; on failure an
    AssertionError with the end of its output (or of ``log``)."""
    if log is not None:
        with open(log, "ab") as out:
            res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw)
        said = log.read_bytes()[-3000:].decode(errors="replace") if res.returncode else ""
    else:
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)
        said = (res.stdout[-1500:] + res.stderr[-1500:]).decode(errors="replace")
    assert res.returncode == 0, f"{' '.join(map(str, cmd[:6]))} ... exited {res.returncode}:\n{said}"
    return res


def debootstrap(target: Path, log: Path, arch: str | None = None, timeout: float = 900) -> float:
    """A minimal Debian (``--variant=minbase``) at ``target``; returns the seconds it took."""
    t0 = time.monotonic()
    run(["debootstrap", "--variant=minbase", *([f"--arch={arch}"] if arch else []), SUITE, str(target), MIRROR],
        timeout, log)
    return time.monotonic() - t0


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].replace("\\040", " ")
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Unmount whatever is mounted below ``path`` and delete it. Refuses to
    delete while anything is still mounted there (a bind mount of the
    checkout must never be reached), and ``rm --one-file-system`` would not
    cross into one anyway."""
    if not os.path.lexists(path):
        return
    for point in mounts_under(path):
        subprocess.run(["umount", point], capture_output=True, timeout=60)
    for point in mounts_under(path):  # busy: detach it, then look again
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)
    left = mounts_under(path)
    assert not left, f"still mounted, {path} left in place: {left}"
    run(["rm", "-rf", "--one-file-system", str(path)], 300)
