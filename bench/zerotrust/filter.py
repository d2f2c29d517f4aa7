"""Flow-filter decisions per second, compiled against pure, in one run
(issue 12, item 7): a session's rule set compiled from 10,000 rules of
random prefixes (/16 to /32) and port ranges, then (1) flow-open decisions
(RuleSet.match on random destinations) and (2) packets of established flows
(ConnTrack.check on 1,000 admitted flows). Usage:

    .venv/bin/python bench/zerotrust/filter.py [--rules 10000] [--seconds 2]
"""

import argparse
import importlib
import random
import time


def rules(ff, n, rnd):
    out = []
    for i in range(n):
        plen = rnd.choice([16, 20, 24, 28, 32])
        net = (10 << 24) | rnd.getrandbits(24)
        lo = rnd.randrange(1, 65000)
        hi = min(65535, lo + rnd.choice([0, 0, 10, 1000]))
        out.append(ff.Rule(6, 32, net, plen, lo, hi, rnd.choice([1, 1, 1, 2, 3]), f"e{i}#0"))
    return out


def rate(fn, seconds):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1000
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    results = {}
    for build in ("_flowfilter_c", "_flowfilter_py"):
        ff = importlib.import_module("relayd.core." + build)
        rnd = random.Random(1)
        t0 = time.perf_counter()
        rs = ff.RuleSet(rules(ff, a.rules, rnd), 1)
        compile_ms = (time.perf_counter() - t0) * 1000
        dests = [((10 << 24) | rnd.getrandbits(24), rnd.randrange(1, 65535)) for _ in range(1000)]

        def opens():
            m = rs.match
            for d, p in dests:
                m(6, 32, d, p)

        ct = ff.ConnTrack()
        allowed = [(d, p) for d, p in dests if rs.match(6, 32, d, p)[0] == 1] or dests[:1]
        flows = [(rnd.getrandbits(32), rnd.randrange(1024, 65535), d, p) for d, p in
                 (allowed * (1000 // len(allowed) + 1))[:1000]]

        def packets():
            c = ct.check
            for s, sp, d, p in flows:
                c(rs, 6, 32, s, sp, d, p)

        packets()
        results[build] = (compile_ms, rate(opens, a.seconds), rate(packets, a.seconds))
    c, p = results["_flowfilter_c"], results["_flowfilter_py"]
    print(f"rules={a.rules}  compile: compiled {c[0]:.0f} ms, pure {p[0]:.0f} ms")
    print(f"flow-open decisions/s: compiled {c[1]:,.0f}  pure {p[1]:,.0f}  ratio {c[1] / p[1]:.2f}")
    print(f"established-flow packets/s: compiled {c[2]:,.0f}  pure {p[2]:,.0f}  ratio {c[2] / p[2]:.2f}")


if __name__ == "__main__":
    main()
