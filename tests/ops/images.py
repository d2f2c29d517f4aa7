"""The container image of the Dockerfile at the root, built the way the
operations tests need it on this machine (../shared/notes/containers.md):
no registry is reachable, so the base image the Dockerfile names is made
here, a minbase bookworm from debootstrap trimmed as Debian's slim images
are (no docs, man pages, locales, apt lists or caches) and imported as
docker.io/library/debian:bookworm-slim; podman then builds the Dockerfile
unchanged on it. For another architecture (arm64) the same happens under
qemu user-mode emulation.

Everything podman makes lives in a storage root of the caller's own
(--root, --runroot under one scratch folder), so removing that folder
removes all of it and nothing else.

The build reaches Debian and PyPI through the host's network. The base
image trusts what the host trusts (its CA bundle goes to
/usr/local/share/ca-certificates), so that a TLS-inspecting egress the host
is configured for works inside the build too; a plain host adds nothing.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from pathlib import Path

from tests.ops.rootfs import MIRROR, debootstrap, remove_tree, run

ROOT = Path(__file__).resolve().parents[2]

BASE = "docker.io/library/debian:bookworm-slim"
#: The limits podman's defaults exceed on this machine (containers.md).
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]

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


def build_image(podman: Podman, scratch: Path, tag: str, arch: str | None = None) -> dict[str, float]:
    """The base (debootstrap, slim, import) and the Dockerfile built as
    ``tag``, for ``arch`` (None: this machine's); the seconds each step took."""
    timings = {}
    rootfs = scratch / f"rootfs-{arch or 'native'}"
    timings["debootstrap"] = debootstrap(rootfs, scratch / "debootstrap.log", arch=arch, timeout=1800)
    slim(rootfs, MIRROR)
    t0 = time.monotonic()
    tar = run(["tar", "-C", str(rootfs), "-c", "."], 300).stdout
    podman("import", *(["--arch", arch] if arch else []), "-", BASE, input=tar, timeout=300)
    del tar
    remove_tree(rootfs)
    timings["import"] = time.monotonic() - t0
    t0 = time.monotonic()
    # docker format: OCI images have no HEALTHCHECK; --layers=false: one
    # layer per stage, nothing cached between runs; --jobs 2: both stages' apt steps at once.
    podman("build", "--format", "docker", "--layers=false", "--jobs", "2", "--network", "host", *LIMITS,
           *(["--arch", arch] if arch else []), "-t", tag, str(ROOT), timeout=5400, log=scratch / "build.log")
    timings["build"] = time.monotonic() - t0
    return timings
