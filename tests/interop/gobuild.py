"""Build the Go yamux interop peer (tests/interop/yamuxpeer/main.go) offline.

The peer is compiled against Debian's golang-github-hashicorp-yamux-dev
(/usr/share/gocode/src/github.com/hashicorp/yamux, snapshot 2019-09-23
df201c7) in GOPATH mode: no modules, no network, no proxy. main.go is copied
into a throw-away GOPATH overlay (GOPATH=<tmp>:/usr/share/gocode) so nothing is
ever written into the source tree; the build cache also lives in the temp dir
unless ``cache_dir`` is given.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

__all__ = ["build_peer", "go_available", "PEER_SOURCE", "SYSTEM_GOPATH"]

PEER_SOURCE = pathlib.Path(__file__).resolve().parent / "yamuxpeer" / "main.go"
SYSTEM_GOPATH = "/usr/share/gocode"
YAMUX_IMPORT = "github.com/hashicorp/yamux"
_OVERLAY_IMPORT = "relaydinterop/yamuxpeer"
_BINARY_NAME = "yamuxpeer"


def _go_binary() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    for candidate in ("/usr/lib/go/bin/go", "/usr/local/go/bin/go"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _yamux_dir() -> pathlib.Path:
    return pathlib.Path(SYSTEM_GOPATH, "src", YAMUX_IMPORT)


def _go_env(tmp: pathlib.Path, gopath_overlay: pathlib.Path, cache_dir: pathlib.Path | None) -> dict[str, str]:
    gotmp = tmp / "gotmp"
    gotmp.mkdir(exist_ok=True)
    cache = cache_dir if cache_dir is not None else tmp / "gocache"
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "GO111MODULE": "off",
        "GOPATH": f"{gopath_overlay}{os.pathsep}{SYSTEM_GOPATH}",
        "GOCACHE": str(cache),
        "GOTMPDIR": str(gotmp),
        "GOFLAGS": "",
        "GOPROXY": "off",
        "GOSUMDB": "off",
        "GOTOOLCHAIN": "local",
        "GOENV": "off",
        "CGO_ENABLED": "0",
    }
    return env


def go_available() -> bool:
    """True if a Go toolchain and Debian's hashicorp/yamux sources are present."""
    go = _go_binary()
    if go is None or not (_yamux_dir() / "session.go").is_file():
        return False
    try:
        res = subprocess.run([go, "version"], capture_output=True, timeout=30,
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                  "GO111MODULE": "off", "GOFLAGS": "", "GOTOOLCHAIN": "local"})
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def build_peer(outdir: pathlib.Path, *, cache_dir: pathlib.Path | None = None,
               timeout: float = 600.0) -> pathlib.Path:
    """Compile the Go peer into ``outdir`` and return the binary's path.

    Raises RuntimeError (with go's output) if Go or yamux is missing or the
    build fails. Never writes outside ``outdir``, a temp dir and ``cache_dir``.
    """
    go = _go_binary()
    if go is None:
        raise RuntimeError("go toolchain not found (apt-get install golang-go)")
    if not (_yamux_dir() / "session.go").is_file():
        raise RuntimeError(f"{_yamux_dir()} missing (apt-get install golang-github-hashicorp-yamux-dev)")
    outdir = pathlib.Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    binary = outdir / _BINARY_NAME
    with tempfile.TemporaryDirectory(prefix="yamuxpeer-build-") as tmpname:
        tmp = pathlib.Path(tmpname)
        overlay = tmp / "gopath"
        pkgdir = overlay / "src" / _OVERLAY_IMPORT
        pkgdir.mkdir(parents=True)
        shutil.copyfile(PEER_SOURCE, pkgdir / "main.go")
        env = _go_env(tmp, overlay, cache_dir)
        cmd = [go, "build", "-trimpath", "-o", str(binary), _OVERLAY_IMPORT]
        try:
            res = subprocess.run(cmd, cwd=pkgdir, env=env, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"go build timed out after {timeout}s: {exc.stderr!r}") from exc
        except OSError as exc:
            raise RuntimeError(f"cannot run {go}: {exc}") from exc
        if res.returncode != 0:
            raise RuntimeError(
                f"go build failed (exit {res.returncode}):\n{res.stderr}{res.stdout}")
    if not binary.is_file():
        raise RuntimeError(f"go build reported success but {binary} is missing")
    return binary


if __name__ == "__main__":  # manual use: python gobuild.py OUTDIR
    import sys

    print(build_peer(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
