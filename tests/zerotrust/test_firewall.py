"""Section 10's firewall cases, from a policy document to the compiled
rules of a session (relayd.control.policy.compile_rules into both builds
of the flow filter), and at a live gateway for what only the gateway
knows (guarded addresses, IPv4-mapped IPv6, the address a name resolves
to being the one checked and dialled)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from fuzz import harness
from relayd.control import policy as pol
from relayd.control.policy import Policy, PolicyError
from relayd.control.ztstore import ZtStore
from relayd.core import _flowfilter_py as pure
from relayd.net import run
from tests.zerotrust.stack import policy_doc, site

ALLOW, BLOCK, PENDING, DENY = pure.ALLOW, pure.BLOCK, pure.PENDING, pure.DENY


def compiled(actions_by_ent: dict, failing: set = frozenset(), resolve=None) -> list:
    """The rule sets (one per build) of a session entitled to every
    entitlement given; those in ``failing`` wait on a condition the user
    does not meet (a reason)."""
    doc = {"sites": [{"id": "s", "networks": ["10.0.0.0/8"]}],
           "conditions": [{"id": "c-why", "criteria": [{"reason": True, "suffix": "why", "max_age": "1m"}],
                           "remedies": [{"type": "reason", "suffix": "why"}]}],
           "entitlements": [{"id": eid, "site": "s", "actions": acts, "conditions": ["c-why"] if eid in failing else []}
                            for eid, acts in actions_by_ent.items()]}
    p = Policy.from_doc(doc)
    ctx = {"user": {}, "device": {}, "system": {}, "stepup": {}, "reasons": {}, "now": 0}
    ents = list(p.entitlements.values())
    states = {e["id"]: pol.judge(e, p.conditions, ctx) for e in ents}
    rules = pol.compile_rules(ents, states, resolve)
    out = []
    for _, mod in harness.builds("flowfilter"):
        out.append(mod.RuleSet([mod.Rule(r.proto, r.bits, r.network, r.prefix, r.lo, r.hi, r.verdict, r.ref)
                                for r in rules], 1))
    return out


def verdicts(sets, proto: int, ip: str, port: int) -> set:
    a = ipaddress.ip_address(ip)
    return {rs.match(proto, 32 if a.version == 4 else 128, int(a), port) for rs in sets}


def allow(proto, hosts, ports=None, types=None, action="allow") -> dict:
    a = {"action": action, "proto": proto, "hosts": hosts}
    if ports is not None:
        a["ports"] = ports
    if types is not None:
        a["types"] = types
    return a


def test_the_precedence_examples():
    sets = compiled({
        "e-wide": [allow("tcp", ["10.1.0.0/16"], ["1-65535"])],
        "e-db": [allow("tcp", ["10.1.2.3"], ["5432"])],  # waits on a reason
        "e-web": [allow("tcp", ["10.1.2.0/24"], ["80-90"]), allow("tcp", ["10.1.2.0/24"], ["85"], action="block")],
        "e-tie": [allow("tcp", ["10.1.3.0/24"], ["22"]), allow("tcp", ["10.1.3.0/24"], ["22"], action="block")],
        "e-start": [allow("tcp", ["10.1.4.0/24"], ["100-110"], action="block"), allow("tcp", ["10.1.4.0/24"], ["105-115"])],
    }, failing={"e-db"})
    # A failing /32 condition shadows the broader unconditional /16 allow (spec section 6).
    assert verdicts(sets, pure.TCP, "10.1.2.3", 5432) == {(PENDING, "e-db#0")}
    assert verdicts(sets, pure.TCP, "10.1.2.4", 5432) == {(ALLOW, "e-wide#0")}
    # Longer prefix first, then the smaller range: the single-port block inside an allowed range.
    assert verdicts(sets, pure.TCP, "10.1.2.9", 85) == {(BLOCK, "e-web#1")}
    assert verdicts(sets, pure.TCP, "10.1.2.9", 86) == {(ALLOW, "e-web#0")}
    # An exact tie: block wins.
    assert verdicts(sets, pure.TCP, "10.1.3.1", 22) == {(BLOCK, "e-tie#1")}
    # Same prefix and size: the higher range start wins.
    assert verdicts(sets, pure.TCP, "10.1.4.1", 107) == {(ALLOW, "e-start#1")}
    assert verdicts(sets, pure.TCP, "10.1.4.1", 102) == {(BLOCK, "e-start#0")}
    # No match: deny; another protocol: deny.
    assert verdicts(sets, pure.TCP, "10.2.0.1", 80) == {(DENY, "")}
    assert verdicts(sets, pure.UDP, "10.1.2.4", 5432) == {(DENY, "")}


def test_port_and_icmp_type_bounds():
    sets = compiled({"e": [allow("tcp", ["10.0.0.1"], ["0", "65535"]), allow("udp", ["10.0.0.1"], ["1"]),
                           allow("icmp", ["10.0.0.1"], types=["0", "255"]), allow("icmpv6", ["fd00::1"], types=["128"])]})
    for proto, port, want in ((pure.TCP, 0, ALLOW), (pure.TCP, 1, DENY), (pure.TCP, 65535, ALLOW),
                              (pure.TCP, 65534, DENY), (pure.UDP, 1, ALLOW), (pure.UDP, 0, DENY),
                              (pure.ICMP, 0, ALLOW), (pure.ICMP, 255, ALLOW), (pure.ICMP, 8, DENY)):
        assert {v for v, _ in verdicts(sets, proto, "10.0.0.1", port)} == {want}, (proto, port)
    assert {v for v, _ in verdicts(sets, pure.ICMPV6, "fd00::1", 128)} == {ALLOW}
    assert {v for v, _ in verdicts(sets, pure.ICMP, "fd00::1", 128)} == {DENY}  # icmp is IPv4 only
    for bad in (["65536"], ["-1"], ["10-5"], ["http"], ["1-70000"]):
        with pytest.raises(PolicyError):
            compiled({"e": [allow("tcp", ["10.0.0.1"], bad)]})
    for bad in (["256"], ["8-300"]):
        with pytest.raises(PolicyError):
            compiled({"e": [allow("icmp", ["10.0.0.1"], types=bad)]})


def test_names_compile_to_what_the_gateway_resolved_and_inactive_allows_vanish():
    sets = compiled({"e-db": [allow("tcp", ["db.lab"], ["5432"])], "e-off": [allow("tcp", ["10.9.0.0/16"], ["22"]),
                                                                             allow("tcp", ["10.9.9.9"], ["22"], action="block")]},
                    failing=set(), resolve=lambda name: {"db.lab": ["10.5.0.7", "fd00::7"]}.get(name, []))
    assert {v for v, _ in verdicts(sets, pure.TCP, "10.5.0.7", 5432)} == {ALLOW}
    assert {v for v, _ in verdicts(sets, pure.TCP, "fd00::7", 5432)} == {ALLOW}
    assert {v for v, _ in verdicts(sets, pure.TCP, "10.5.0.8", 5432)} == {DENY}
    # A name nobody resolved yet gives no rule at all (deny), never a wildcard.
    sets = compiled({"e-db": [allow("tcp", ["db.lab"], ["5432"])]}, resolve=lambda name: [])
    assert {v for v, _ in verdicts(sets, pure.TCP, "10.5.0.7", 5432)} == {DENY}


def test_guarded_addresses_mapped_ipv6_and_the_dialled_address_at_a_live_gateway(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            doc = policy_doc()
            doc["sites"][0]["networks"] = ["0.0.0.0/0"]
            # A /0 allow: it does not reach loopback, link-local or the metadata address.
            doc["entitlements"][0]["actions"].append({"action": "allow", "proto": "tcp", "hosts": ["0.0.0.0/0"],
                                                      "ports": ["1-65535"]})
            # A name entitled by name: what it resolves to is what is checked.
            doc["entitlements"][0]["actions"].append({"action": "allow", "proto": "tcp", "hosts": ["localhost"],
                                                      "ports": ["1-65535"]})
            ZtStore(s.relay.store).import_policy(Policy.from_doc(doc))
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                sess = c.sessions["s-lab"]
                for host in ("169.254.169.254", "127.0.0.9", "0.0.0.1"):
                    st, reply = await sess.open_flow(host, 80)
                    assert st is None and reply["r"] == "denied", (host, reply)
                # Named by its own /32 rule: allowed (stack's e-open names 127.0.0.2).
                st, reply = await sess.open_flow("::ffff:127.0.0.2", s.ports["open"])
                assert st is not None and reply["ip"] == "127.0.0.2", reply
                st.reset()
                # A name: the gateway resolves it and checks the address it will
                # dial; entitling the name does not entitle a loopback answer
                # (DNS rebinding): localhost is 127.0.0.1, which no rule names.
                st, reply = await sess.open_flow("localhost", s.ports["open"])
                assert st is None and reply["r"] == "denied", reply
            finally:
                await c.close()

    run(main())
