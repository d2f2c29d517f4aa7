"""Build bench/tunnel's Go programs offline (GOPATH mode, no modules, no network).

The same approach as tests/interop/gobuild.py, generalised to several
programs: each ``<name>/main.go`` is copied into a throw-away GOPATH overlay
(GOPATH=<tmp>/gopath:/usr/share/gocode) so github.com/hashicorp/yamux resolves
to Debian's golang-github-hashicorp-yamux-dev (2019 snapshot); nothing is ever
written into the source tree, and only the build cache may be kept
(``cache_dir``).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from tests.interop.gobuild import _go_binary, _go_env  # noqa: E402  (one offline-build recipe)

SYSTEM_GOPATH = "/usr/share/gocode"
YAMUX_DIR = pathlib.Path(SYSTEM_GOPATH, "src", "github.com", "hashicorp", "yamux")
PROGRAMS = ("gotunnel", "rr")


def go_binary() -> str | None:
    return _go_binary()


def go_env(tmp: pathlib.Path, overlay: pathlib.Path, cache: pathlib.Path) -> dict[str, str]:
    return _go_env(tmp, overlay, cache)


def build(outdir: pathlib.Path, cache_dir: pathlib.Path | None = None,
          programs: tuple[str, ...] = PROGRAMS, timeout: float = 600.0) -> dict[str, pathlib.Path]:
    """Compile every program into ``outdir``; return {name: binary path}."""
    go = go_binary()
    if go is None:
        raise RuntimeError("go toolchain not found (apt-get install golang-go)")
    if not (YAMUX_DIR / "session.go").is_file():
        raise RuntimeError(f"{YAMUX_DIR} missing (apt-get install golang-github-hashicorp-yamux-dev)")
    outdir = pathlib.Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    out: dict[str, pathlib.Path] = {}
    with tempfile.TemporaryDirectory(prefix="tunnelbench-gobuild-") as tmpname:
        tmp = pathlib.Path(tmpname)
        overlay = tmp / "gopath"
        env = go_env(tmp, overlay, pathlib.Path(cache_dir).resolve() if cache_dir else tmp / "gocache")
        for name in programs:
            imp = f"relaydbench/{name}"
            pkgdir = overlay / "src" / imp
            pkgdir.mkdir(parents=True)
            shutil.copyfile(HERE / name / "main.go", pkgdir / "main.go")
            binary = outdir / name
            cmd = [go, "build", "-trimpath", "-o", str(binary), imp]
            try:
                res = subprocess.run(cmd, cwd=pkgdir, env=env, capture_output=True,
                                     text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"go build {name} timed out after {timeout}s") from exc
            if res.returncode != 0 or not binary.is_file():
                raise RuntimeError(f"go build {name} failed (exit {res.returncode}):\n"
                                   f"{res.stderr}{res.stdout}")
            out[name] = binary
    return out


if __name__ == "__main__":  # manual use: python gobuild.py OUTDIR
    import sys

    print(build(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())))
