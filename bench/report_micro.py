"""Turn pytest-benchmark JSON of bench/test_micro.py into a markdown table."""

import json
import sys


def main(path):
    data = json.load(open(path))
    rows = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        kind = ("parse+dispatch" if b["name"].startswith("test_parse_dispatch")
                else "parse" if b["name"].startswith("test_parse") else "build")
        med = b["stats"]["median"]
        rows[(kind, info["size"], info["build"])] = (
            info["frames_per_round"] / med,
            info["bytes_per_round"] / med,
        )
    out = ["| operation | frame size | compiled frames/s | pure frames/s | compiled / pure | compiled GB/s |",
           "|---|---|---:|---:|---:|---:|"]
    for kind in ("parse", "parse+dispatch", "build"):
        for size in ("64B", "16KiB", "256KiB"):
            c = rows.get((kind, size, "compiled"))
            p = rows.get((kind, size, "pure"))
            if not c or not p:
                continue
            out.append(f"| {kind} | {size} | {c[0]:,.0f} | {p[0]:,.0f} | {c[0] / p[0]:.1f}x | {c[1] / 1e9:.2f} |")
    machine = data.get("machine_info", {})
    out.append("")
    out.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
               f"{machine.get('cpu', {}).get('count', '?')} cores, Python {machine.get('python_version', '?')}; "
               f"medians of pytest-benchmark rounds.")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
