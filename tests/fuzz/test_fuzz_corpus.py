"""The fuzz harnesses without a fuzzer: every committed corpus input replayed
in-process (fast, deterministic, needs no atheris), so a regression on a
seed or on a crash reproducer added to the corpus fails here first."""

import importlib
import os

import pytest

from fuzz import harness, make_corpus

HARNESSES = sorted(make_corpus.HARNESSES)


def corpus(h):
    d = os.path.join(make_corpus.CORPUS, h)
    return [os.path.join(d, n) for n in sorted(os.listdir(d))]


@pytest.mark.parametrize("h", HARNESSES)
def test_every_corpus_input_passes_its_harness(h):
    mod = importlib.import_module(f"fuzz.fuzz_{h}")
    files = corpus(h)
    assert len(files) >= 20
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            mod.test_one_input(data)
        except harness.Finding as exc:
            pytest.fail(f"{os.path.relpath(path)}: {exc}")


def test_committed_seeds_are_what_make_corpus_makes(capsys):
    assert make_corpus.main(["--check"]) == 0, capsys.readouterr().out


def test_seeds_are_small():
    for h in HARNESSES:
        for path in corpus(h):
            assert os.path.getsize(path) <= 4096, path


def test_script_format():
    data = harness.script_of(5, [(b"abcdefghijklmnopq", 3), (b"", 7), (b"xyz", 0)])
    s = harness.Script(data)
    assert s.mode == 5
    reads = list(s.reads())
    assert b"".join(chunk for _, chunk, _ in reads) == b"abcdefghijklmnopqxyz"
    assert [cmd for _, _, cmd in reads if cmd] == [3, 7]
    assert [chunk for _, chunk, cmd in reads if cmd == 3] == [b"q"]
    # Steps past the end of the wire bytes still run their commands.
    assert list(harness.Script(bytes([0, 2, harness.step(16, 1), harness.step(1, 2)]) + b"ab").reads()) == [
        (0, b"ab", 1), (1, b"", 2)]
    # Short and empty inputs are inputs too.
    for data in (b"", b"\x00", b"\x07\xff"):
        assert [chunk for _, chunk, _ in harness.Script(data).reads()] == []


def test_builds_follow_relayd_no_extensions():
    labels = [label for label, _ in harness.builds("yamux")]
    from relayd._build import extensions_disabled

    assert labels == (["pure"] if extensions_disabled() else ["compiled", "pure"])
