"""Fuzz zero-trust policy documents (relayd/control/policy.py) as the admin
API (JSON) and `relayd admin policy import` (TOML) read them: ``check`` of
one object of each kind, ``Policy.from_doc`` of a whole document, the TOML
export (``to_toml``) read back, and what the controller and the gateway do
with a policy that passed: ``select`` for a few users, ``judge`` of each
entitlement in a few sessions, ``compile_rules``, ``next_deadline``. Pure
Python only.

The wire bytes are the document's text. Mode bits 0-1: the kind for
``check`` (sites, conditions, entitlements, policies); bit 2: a whole
document (``from_doc``) instead; bit 3: the text is TOML, not JSON.

Oracles:

* only ``PolicyError`` escapes ``check`` and ``from_doc`` (text that is not
  JSON or TOML at all is the input's problem and skipped);
* a normal form is a fixed point: ``check`` of it gives it back, and a
  whole policy's document survives ``from_doc`` again, JSON and the TOML
  export (``to_toml`` must write TOML that reads back to the same policy);
* nothing escapes the evaluation of a policy that passed; a judgement's
  state is active, pending (with remedies) or inactive; rules carry the
  entitlement's verdicts and refs.

    python fuzz/fuzz_policy.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys
import tomllib

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import orjson

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import policy as pol
    from relayd.core import flowfilter as ff

KIND, WHOLE, TOML = 3, 4, 8
#: Users a policy is selected for, and sessions its conditions are judged in.
USERS = ({"username": "alice", "provider": "local", "groups": ["staff", "dba"], "email": "alice@example.com"},
         {"username": "bob", "provider": "corp", "groups": []}, {})
CONTEXTS = (
    {"user": USERS[0], "device": {"os": {"family": "linux", "version": "6.8"}, "av": {"enabled": True}},
     "system": {"client_src_ip": "198.51.100.7", "connect_time": 1732350000, "site": "s-lab"},
     "stepup": {"otp:lab": {"at": 1732350000, "p": "totp"}}, "reasons": {"why": (1732350000, "ticket OPS-42")},
     "now": 1732350060},
    {"user": USERS[1], "device": {}, "system": {"client_src_ip": "::ffff:10.0.0.1", "site": "s-lab"},
     "stepup": {}, "reasons": {}, "now": 1732393200},
    {"now": 0},
)


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    try:
        doc = tomllib.loads(script.wire.decode("utf-8")) if script.mode & TOML else orjson.loads(script.wire)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, orjson.JSONDecodeError):
        return
    except RecursionError:
        return  # the reader's own depth limit (tomllib), before relayd sees anything
    if script.mode & WHOLE:
        _whole(doc)
    else:
        _one(pol.KINDS[script.mode & KIND], doc)


def _one(kind: str, doc) -> None:
    try:
        out = pol.check(kind, doc)
    except pol.PolicyError:
        return
    except Exception as exc:
        raise Finding(f"check({kind}): {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    check(isinstance(out, dict) and pol._ID.match(out["id"]) is not None, "a normal form without an id")
    group = out.get("match") if kind == "policies" else out if kind == "conditions" else None
    check(group is None or _depth(group["criteria"]) <= pol.MAX_DEPTH, "criteria nested deeper than evaluated")
    again = _safe(pol.check, kind, out)
    check(again == out, f"check({kind}) of its normal form differs: {again!r:.200}")


def _whole(doc) -> None:
    try:
        p = pol.Policy.from_doc(doc)
    except pol.PolicyError:
        return
    except Exception as exc:
        raise Finding(f"from_doc: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    out = p.to_doc()
    check(_safe(pol.Policy.from_doc, out).to_doc() == out, "from_doc of its own document differs")
    check(_safe(pol.Policy.from_doc, orjson.loads(orjson.dumps(out))).to_doc() == out, "a JSON round trip differs")
    text = _safe(pol.to_toml, out)
    try:
        back = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Finding(f"to_toml wrote what is not TOML ({exc}): {text[:300]!r}") from exc
    check(_safe(pol.Policy.from_doc, back).to_doc() == out, "the TOML export reads back to another policy")
    _evaluate(p)


def _evaluate(p: pol.Policy) -> None:
    try:
        for user in USERS:
            ids, stop = p.select(user)
            check(stop is None or stop in p.policies, "select: a stop policy that is not one")
            check(all(i in p.entitlements for i in ids), "select: an entitlement that is not one")
        ents = sorted(p.entitlements.values(), key=lambda e: e["id"])
        for ctx in CONTEXTS:
            states = {e["id"]: pol.judge(e, p.conditions, ctx) for e in ents}
            for e in ents:
                j = states[e["id"]]
                check(j.state in ("active", "pending", "inactive"), f"state {j.state!r}")
                check((j.state == "pending") == bool(j.remedies) or j.state == "active", "pending without remedies")
            rules = pol.compile_rules(ents, states, lambda name: ["10.0.0.1", "2001:db8::1"])
            for r in rules:
                check(r.verdict in (ff.ALLOW, ff.BLOCK, ff.PENDING), f"verdict {r.verdict}")
                check(r.ref.partition("#")[0] in p.entitlements, f"ref {r.ref!r}")
            ff.RuleSet(rules, 1)
            pol.next_deadline(p.conditions, ctx)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"evaluating a valid policy: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc


def _depth(criteria: list, d: int = 0) -> int:
    """How deep the evaluator goes into these criteria (its depth count)."""
    out = d
    for c in criteria:
        if "criteria" in c:
            out = max(out, _depth(c["criteria"], d + 1))
        elif "not" in c:
            out = max(out, _depth([c["not"]], d + 1))
    return out


def _safe(f, *args):
    """``f(*args)`` on what relayd made itself: any exception is a finding."""
    try:
        return f(*args)
    except Exception as exc:
        raise Finding(f"{f.__name__} of a normal form: {type(exc).__name__}: {exc!r}"[:300]) from exc


if __name__ == "__main__":
    harness.main(test_one_input)
