"""The short fuzz run of CI: ``bash fuzz/run.sh --short HARNESS`` for each
harness, a fixed number of runs from the committed seeds with a fixed seed,
on whichever build is active (compiled against pure, or the pure twin alone
under RELAYD_NO_EXTENSIONS=1)."""

import os
import platform
import subprocess
import sys

import pytest

from fuzz import make_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# atheris ships wheels for x86-64 Linux only (the pin in pyproject.toml says
# so); elsewhere it needs clang and libFuzzer to build, and this run skips.
if not (sys.platform == "linux" and platform.machine() == "x86_64"):
    pytest.importorskip("atheris")


@pytest.mark.parametrize("h", sorted(make_corpus.HARNESSES))
def test_short_fuzz_run_finds_no_crash(h):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "fuzz", "run.sh"), "--short", h], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout
