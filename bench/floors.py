"""The floors of the CI benchmark's ratios, and their check.

A ratio compares relayd with a peer measured in the same run (bench/ci.py),
oriented so that higher is better for relayd. ``bench/floors.toml`` gives
some ratios a floor, each with the reason for it and the runs it was derived
from. The check fails when a floored ratio is below its floor or is missing
from the run (a peer that did not start, a measurement that failed): a
missing figure must never pass as "no regression". Ratios without a floor
are recorded and shown, never judged. No absolute number is ever checked.

    .venv/bin/python bench/floors.py bench/results/ci.json [FLOORS]   # re-check a run's JSON
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import tomllib
from dataclasses import asdict, dataclass
from typing import Mapping

HERE = pathlib.Path(__file__).resolve().parent
FLOORS = HERE / "floors.toml"
#: The command that re-runs the benchmark, named in every failure.
REPRODUCE = "bash bench/ci.sh"


class FloorsError(ValueError):
    """The floors file is malformed."""


@dataclass(frozen=True)
class Floor:
    ratio: str
    floor: float
    reason: str
    derived: str


@dataclass(frozen=True)
class Verdict:
    ratio: str
    value: float | None
    floor: float
    ok: bool
    message: str


def load(path: pathlib.Path = FLOORS) -> dict[str, Floor]:
    """The floors of ``path``: ``[ratios."NAME"]`` tables with ``floor`` (a
    positive number), ``reason`` and ``derived`` (date, runs and commit)."""
    try:
        doc = tomllib.loads(pathlib.Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FloorsError(f"{path}: {exc}") from exc
    table = doc.get("ratios")
    if not isinstance(table, dict) or not table:
        raise FloorsError(f"{path}: no [ratios.\"NAME\"] table")
    out = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise FloorsError(f"{path}: ratios.{name!r} is not a table")
        unknown = set(entry) - {"floor", "reason", "derived"}
        if unknown:
            raise FloorsError(f"{path}: ratios.{name!r}: unknown keys {sorted(unknown)}")
        floor = entry.get("floor")
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor > 0:
            raise FloorsError(f"{path}: ratios.{name!r}: floor must be a positive number, not {floor!r}")
        for key in ("reason", "derived"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise FloorsError(f"{path}: ratios.{name!r}: {key} is missing or empty")
        out[name] = Floor(name, float(floor), entry["reason"].strip(), entry["derived"].strip())
    return out


def check(ratios: Mapping[str, float | None], floors: Mapping[str, Floor],
          reproduce: str = REPRODUCE) -> list[Verdict]:
    """One verdict per floor, in the floors file's order."""
    verdicts = []
    for name, f in floors.items():
        value = ratios.get(name)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            verdicts.append(Verdict(name, None, f.floor, False,
                                    f"FAIL {name}: no figure in this run (floor {f.floor:g}); "
                                    f"reproduce: {reproduce}"))
        elif value < f.floor:
            verdicts.append(Verdict(name, value, f.floor, False,
                                    f"FAIL {name} = {value:.3f}, below its floor {f.floor:g} "
                                    f"({f.reason}); reproduce: {reproduce}"))
        else:
            verdicts.append(Verdict(name, value, f.floor, True,
                                    f"ok   {name} = {value:.3f} (floor {f.floor:g})"))
    return verdicts


def judge(result: dict, out: pathlib.Path | None, floors_path: pathlib.Path = FLOORS,
          reproduce: str = REPRODUCE) -> int:
    """Check ``result["ratios"]`` (name -> {"value": ...} or a number) against
    the floors, add the verdicts to ``result``, write it to ``out`` as JSON,
    print a line per floor and per unfloored ratio; 0 when every floor holds,
    1 otherwise (a malformed floors file fails too, with its reason)."""
    ratios = {k: (v.get("value") if isinstance(v, dict) else v)
              for k, v in (result.get("ratios") or {}).items()}
    try:
        floors = load(floors_path)
        verdicts = check(ratios, floors, reproduce)
        result["floors"] = {k: asdict(f) for k, f in floors.items()}
        result["checks"] = [asdict(v) for v in verdicts]
        failed = [v.message for v in verdicts if not v.ok]
    except FloorsError as exc:
        floors, verdicts = {}, []
        failed = [f"FAIL floors file: {exc}"]
        result["checks"] = []
    result["failures"] = failed
    result["passed"] = not failed
    if out is not None:
        out = pathlib.Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    for v in verdicts:
        print(v.message, flush=True)
    for name, value in ratios.items():
        if name not in floors and value is not None:
            print(f"     {name} = {value:.3f} (recorded, no floor)", flush=True)
    if failed:
        print(f"\n{len(failed)} benchmark floor(s) failed:", file=sys.stderr)
        for m in failed:
            print("  " + m, file=sys.stderr)
    if out is not None:
        print(f"JSON: {out}", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print("usage: " + __doc__.strip().splitlines()[-1].split("#")[0].strip(), file=sys.stderr)
        return 2
    path = pathlib.Path(argv[0])
    return judge(json.loads(path.read_text()), None, pathlib.Path(argv[1]) if len(argv) > 1 else FLOORS,
                 reproduce=f"{REPRODUCE}  (re-checked {path})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
