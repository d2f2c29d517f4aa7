"""Fuzz the zero-trust session's message checks (relayd/gateway/ztmessages.py)
the way the gateway runs them, without a network: a message body as it
comes off a stream (``relayd.core.framing.decode_body``), then
``control_message`` (a hello, or an update after it) or ``flow_request``,
then the device report's check (``relayd.control.zerotrust.device_claims``)
for a hello or a device update that passed. Pure Python only.

The wire bytes are the message body: msgpack, or (mode bit 2) JSON turned
into msgpack first, so that the mutator can work on text. Mode bit 0: the
session said hello already; bit 1: a flow request.

Oracles:

* only ``FramingError`` escapes the decoder, only ``MessageError`` the
  checks (with a documented reason, and a text that quotes no input), only
  ``Refused`` (bad_device_claims) the device check;
* an accepted message is in its normal form: the known keys of its type,
  each of its type; a reason is one line of at most 512 characters; a flow's
  host is a canonical address (no zone, IPv4-mapped as IPv4) or a lower-case
  host name; the normal form is a fixed point of the check, and survives a
  msgpack round trip.

    python fuzz/fuzz_ztsession.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import ipaddress
import os
import sys
import unicodedata

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack
import orjson

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import policy as pol
    from relayd.control.zerotrust import Refused, device_claims
    from relayd.core.framing import FramingError, decode_body
    from relayd.gateway import ztmessages as zm

HELLO_DONE, FLOW, JSON = 1, 2, 4
REASONS = {"bad_hello", "bad_message", "unexpected_message", "unknown_message", "bad_reason", "reason_too_long",
           "bad_request"}
#: The keys of each normal form.
SHAPES = {"hello": {"type", "claims", "entitlements", "device", "reasons"},
          "tokens": {"type", "claims", "entitlements", "certificate"},
          "claims": {"type", "claims", "entitlements", "certificate"},
          "entitlements": {"type", "claims", "entitlements", "certificate"},
          "device": {"type", "claims"}, "reason": {"type", "interaction", "suffix", "text"}, "ping": {"type"}}


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    wire = script.wire
    if script.mode & JSON:
        try:
            wire = msgpack.packb(orjson.loads(wire), use_bin_type=True)
        except (orjson.JSONDecodeError, TypeError, ValueError, OverflowError):
            return  # not JSON: the input's problem, not the gateway's
    try:
        doc = decode_body(wire)
    except FramingError:
        return
    except Exception as exc:
        raise Finding(f"decode_body: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    if script.mode & FLOW:
        _flow(doc)
    else:
        _control(doc, bool(script.mode & HELLO_DONE))


def _refused(exc: zm.MessageError, doc) -> None:
    check(exc.reason in REASONS, f"undocumented reason {exc.reason!r}")
    text = str(exc)
    check(len(text) < 200, "a refusal's text is long")
    for s in _strings(doc):
        check(len(s) < 24 or s not in text, "a refusal's text quotes the input")


def _strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _strings(k)
            yield from _strings(x)
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _strings(x)


def _control(doc: dict, hello_done: bool) -> None:
    try:
        m = zm.control_message(doc, hello_done)
    except zm.MessageError as exc:
        _refused(exc, doc)
        return
    except Exception as exc:
        raise Finding(f"control_message: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    t = m.get("type")
    check(t in SHAPES and set(m) == SHAPES[t], f"normal form of a {t!r}: keys {sorted(m)}")
    check((t == "hello") != hello_done, f"a {t} accepted {'after' if hello_done else 'before'} hello")
    if t in ("hello", "tokens", "claims", "entitlements"):
        for k in ("claims", "entitlements"):
            check(m[k] is None or isinstance(m[k], str), f"{t}: {k} not a string")
        check(t == "hello" or m["claims"] is not None or m["entitlements"] is not None, f"{t} without a token")
        check(t == "hello" or m["certificate"] is None or isinstance(m["certificate"], str), "certificate")
    if t == "hello":
        check(isinstance(m["device"], dict), "hello: device")
        check(isinstance(m["reasons"], list) and len(m["reasons"]) <= zm.MAX_REASONS, "hello: reasons")
        for r in m["reasons"]:
            check(set(r) == {"suffix", "text", "at"} and type(r["at"]) is int, f"hello: a reason {r!r:.100}")
            _reason_ok(r["suffix"], r["text"])
    elif t == "reason":
        check(isinstance(m["interaction"], str) and len(m["interaction"]) == 32
              and all(c in "0123456789abcdef" for c in m["interaction"]), "reason: interaction")
        _reason_ok(m["suffix"], m["text"])
    elif t == "device":
        check(isinstance(m["claims"], dict), "device: claims")
    if t in ("hello", "device"):
        report = m["device"] if t == "hello" else m["claims"]
        try:
            out = device_claims(report)
        except Refused as exc:
            check(exc.reason == "bad_device_claims", f"device_claims refused with {exc.reason!r}")
        except Exception as exc:
            raise Finding(f"device_claims: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
        else:
            check(out is report, "device_claims changed the report")
    check(zm.control_message(m, hello_done) == m, "the normal form is not a fixed point")
    check(decode_body(msgpack.packb(m, use_bin_type=True)) == m, "the normal form does not survive msgpack")


def _reason_ok(suffix, text) -> None:
    check(isinstance(suffix, str) and pol._SUFFIX.match(suffix) is not None, "a reason's suffix")
    check(isinstance(text, str) and len(text) <= pol.MAX_REASON, "a reason's length")
    check(not any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in text), "a control character in a reason")


def _flow(doc: dict) -> None:
    try:
        proto, host, port, is_name = zm.flow_request(doc)
    except zm.MessageError as exc:
        _refused(exc, doc)
        return
    except Exception as exc:
        raise Finding(f"flow_request: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    check(proto == "tcp", "proto")
    check(type(port) is int and 0 < port < 65536, f"port {port!r}")
    check(isinstance(host, str) and 0 < len(host) <= 253, "host")
    if is_name:
        check(pol._is_name(host) and host == host.lower() and not host.endswith("."), f"host name {host!r}")
    else:
        a = ipaddress.ip_address(host)
        check(str(a) == host, f"address {host!r} not canonical")
        check(not (a.version == 6 and (a.scope_id is not None or a.ipv4_mapped is not None)),
              f"address {host!r}: a zone or IPv4-mapped")
    again = zm.flow_request({"proto": proto, "host": host, "port": port})
    check(again == (proto, host, port, is_name), f"not a fixed point: {again!r}")


if __name__ == "__main__":
    harness.main(test_one_input)
