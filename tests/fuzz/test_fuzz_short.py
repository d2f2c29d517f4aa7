"""The short fuzz run of CI: ``bash fuzz/run.sh --short HARNESS`` for each
harness, a fixed number of runs from the committed seeds with a fixed seed.
With the compiled build each input runs through the compiled module and its
pure twin and their outcomes are compared, so both builds are fuzzed in that
one pass: the run is marked ``once`` (scripts/test.sh's pure pass, where only
the twin exists, would fuzz the same twin again)."""

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


@pytest.mark.once
@pytest.mark.parametrize("h", sorted(make_corpus.HARNESSES))
def test_short_fuzz_run_finds_no_crash(h):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "fuzz", "run.sh"), "--short", h], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout
