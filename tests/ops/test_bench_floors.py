"""bench/floors.py, the judge of CI's short benchmark (bench/ci.py), checked
on made-up results without running any benchmark: a ratio below its floor
fails and says which, its value, its floor and how to reproduce it; a
missing figure fails; a malformed floors file fails; the JSON artifact is
written in every case. And the repository's own bench/floors.toml names only
ratios that bench/ci.py produces."""

from __future__ import annotations

import json

import pytest

from bench import ci, floors

FLOORS = """
[ratios."tunnel.throughput relayd/gotunnel"]
floor = 0.5
reason = "relayd's single stream against the Go tunnel's"
derived = "made up for this test"

[ratios."http.requests relayd/nginx"]
floor = 0.25
reason = "keep-alive requests against nginx"
derived = "made up for this test"
"""


@pytest.fixture
def floors_file(tmp_path):
    path = tmp_path / "floors.toml"
    path.write_text(FLOORS)
    return path


def judged(tmp_path, floors_file, res, capsys):
    out = tmp_path / "results" / "ci.json"
    rc = floors.judge(res, out, floors_file)
    captured = capsys.readouterr()
    return rc, json.loads(out.read_text()), captured.out + captured.err


def test_every_ratio_above_its_floor_passes_and_writes_the_json(tmp_path, floors_file, capsys):
    res = {"commit": "abc", "ratios": {"tunnel.throughput relayd/gotunnel": {"value": 1.2},
                                       "http.requests relayd/nginx": {"value": 0.5},
                                       "http.download relayd/nginx": {"value": 0.01}}}
    rc, doc, text = judged(tmp_path, floors_file, res, capsys)
    assert rc == 0
    assert doc["passed"] is True and doc["failures"] == []
    assert doc["commit"] == "abc" and doc["ratios"] == res["ratios"]
    assert [c["ratio"] for c in doc["checks"]] == ["tunnel.throughput relayd/gotunnel",
                                                   "http.requests relayd/nginx"]
    assert all(c["ok"] for c in doc["checks"])
    assert doc["floors"]["http.requests relayd/nginx"]["reason"] == "keep-alive requests against nginx"
    # A ratio without a floor is shown, never judged.
    assert "http.download relayd/nginx = 0.010 (recorded, no floor)" in text


def test_a_ratio_below_its_floor_fails_with_ratio_value_floor_and_command(tmp_path, floors_file, capsys):
    res = {"ratios": {"tunnel.throughput relayd/gotunnel": {"value": 0.41},
                      "http.requests relayd/nginx": {"value": 0.5}}}
    rc, doc, text = judged(tmp_path, floors_file, res, capsys)
    assert rc == 1
    assert doc["passed"] is False
    [failure] = doc["failures"]
    assert failure.startswith("FAIL tunnel.throughput relayd/gotunnel = 0.410, below its floor 0.5")
    assert "reproduce: bash bench/ci.sh" in failure
    assert failure in text
    checks = {c["ratio"]: c for c in doc["checks"]}
    assert checks["tunnel.throughput relayd/gotunnel"]["ok"] is False
    assert checks["tunnel.throughput relayd/gotunnel"]["value"] == 0.41
    assert checks["http.requests relayd/nginx"]["ok"] is True


@pytest.mark.parametrize("ratios", [
    {"tunnel.throughput relayd/gotunnel": {"value": 1.0}},                   # never measured
    {"tunnel.throughput relayd/gotunnel": {"value": 1.0},
     "http.requests relayd/nginx": {"value": None}},                         # every sample failed
    {"tunnel.throughput relayd/gotunnel": {"value": 1.0},
     "http.requests relayd/nginx": {"value": float("nan")}},
], ids=["absent", "none", "nan"])
def test_a_missing_figure_fails(tmp_path, floors_file, capsys, ratios):
    rc, doc, text = judged(tmp_path, floors_file, {"ratios": ratios}, capsys)
    assert rc == 1
    [failure] = doc["failures"]
    assert failure.startswith("FAIL http.requests relayd/nginx: no figure in this run (floor 0.25)")
    assert "reproduce: bash bench/ci.sh" in failure and failure in text


def test_a_run_that_measured_nothing_fails_every_floor(tmp_path, floors_file, capsys):
    rc, doc, _ = judged(tmp_path, floors_file, {"error": "RuntimeError: nginx exited 1"}, capsys)
    assert rc == 1 and len(doc["failures"]) == 2
    assert doc["error"] == "RuntimeError: nginx exited 1"


@pytest.mark.parametrize("text, why", [
    ("", "no [ratios"),
    ('[ratios."a b/c"]\nfloor = 0\nreason = "r"\nderived = "d"\n', "positive number"),
    ('[ratios."a b/c"]\nfloor = true\nreason = "r"\nderived = "d"\n', "positive number"),
    ('[ratios."a b/c"]\nfloor = 0.5\nderived = "d"\n', "reason is missing"),
    ('[ratios."a b/c"]\nfloor = 0.5\nreason = "r"\nderived = " "\n', "derived is missing"),
    ('[ratios."a b/c"]\nfloor = 0.5\nreason = "r"\nderived = "d"\nceiling = 2\n', "unknown keys"),
    ("[ratios\n", "floors.toml"),
])
def test_a_malformed_floors_file_fails(tmp_path, capsys, text, why):
    path = tmp_path / "floors.toml"
    path.write_text(text)
    with pytest.raises(floors.FloorsError, match=why.replace("[", r"\[")):
        floors.load(path)
    rc, doc, out = judged(tmp_path, path, {"ratios": {"a b/c": {"value": 9.0}}}, capsys)
    assert rc == 1 and doc["failures"][0].startswith("FAIL floors file:") and why in out


def test_recheck_of_a_written_json(tmp_path, floors_file, capsys):
    out = tmp_path / "ci.json"
    floors.judge({"ratios": {"tunnel.throughput relayd/gotunnel": {"value": 0.3},
                             "http.requests relayd/nginx": {"value": 0.3}}}, out, floors_file)
    capsys.readouterr()
    assert floors.main([str(out), str(floors_file)]) == 1
    err = capsys.readouterr().err
    assert "FAIL http.requests relayd/nginx = 0.300, below its floor 0.25" not in err
    assert f"below its floor 0.5 (relayd's single stream against the Go tunnel's); " \
           f"reproduce: bash bench/ci.sh  (re-checked {out})" in err


def test_the_repository_floors_name_ratios_that_the_benchmark_makes():
    made = {ci.ratio_name(figure, peer) for figure, (_, _, peers) in ci.FIGURES.items() for peer in peers}
    got = floors.load()
    assert got, "bench/floors.toml has no floor"
    assert set(got) <= made, sorted(set(got) - made)
    for f in got.values():
        assert f.floor < 1.5 and "run" in f.derived, f
