"""Fuzz the hybrid connections' wire parsers (relayd/core/hcwire.py) and SAS
token parsing (relayd/control/sas.py). Pure Python only.

Mode bit 0 clear: the wire bytes are a request target under ``/$hc/`` (as
the front door hands it over); set: a listener's control message (text).
Bit 1: the same bytes as a SAS token, checked against a rule.

Oracles:

* ``parse_target`` never raises; what it returns keeps the relay's pairs
  (``sb-hc-*``) and the application's apart, and an address built from it
  parses back to the same path, app query and relay parameters;
* ``parse_listener_message`` raises nothing but ``HcProtocolError``, and what
  it returns has the types its users rely on;
* ``sas.check`` raises nothing but ``SasError`` (401 or 403), whose text
  never quotes the token's signature.

    python fuzz/fuzz_hcwire.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import sas
    from relayd.core import hcwire

RULE = sas.SasRule("root", "a-key-for-the-fuzzer-0123", rights=frozenset({"listen"}))


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    wire = b"".join(chunk for _, chunk, _ in script.reads())
    try:
        if script.mode & 2:
            token(wire)
        elif script.mode & 1:
            message(wire)
        else:
            target(wire)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc!r}"[:300]) from exc


def target(wire: bytes) -> None:
    t = hcwire.parse_target(b"/$hc/" + wire)
    check(t is not None, "a /$hc/ target not taken")
    check(all(k.startswith("sb-hc-") and k == k.lower() for k in t.params), "a relay parameter misnamed")
    for pair in t.app_query.split("&") if t.app_query else ():
        name, eq, _ = pair.partition("=")
        check(not (eq and name.lower().startswith("sb-hc-")), "a relay parameter left in the app query")
    if not t.path or "?" in t.path or "#" in t.path or any(ord(c) < 33 or ord(c) > 126 for c in t.path):
        return
    params = [(k, v) for k, v in t.params.items() if v.isprintable()]
    addr = hcwire.address("relay.example", t.path, "", t.app_query, params)
    back = hcwire.parse_target(addr.split("relay.example", 1)[1].encode("latin-1"))
    check(back.path == t.path.strip("/"), f"address path {back.path!r} != {t.path!r}")
    check(back.app_query == t.app_query, "address app query changed")
    check(back.params == dict(params), f"address parameters changed: {back.params} != {dict(params)}")


def message(wire: bytes) -> None:
    text = wire.decode("utf-8", "replace")
    try:
        msg = hcwire.parse_listener_message(text)
    except hcwire.HcProtocolError:
        return
    if type(msg) is hcwire.RenewToken:
        check(isinstance(msg.token, str) and msg.token, "renewToken without a token string")
    elif type(msg) is hcwire.Response:
        check(isinstance(msg.status, int) and 100 <= msg.status <= 999, "response status out of range")
        check(isinstance(msg.request_id, str) and isinstance(msg.description, str), "response fields")
        check(all(isinstance(k, str) and isinstance(v, str) for k, v in msg.headers.items()), "response headers")
    else:
        check(type(msg) is hcwire.Unknown and isinstance(msg.name, str), "unknown message")


def token(wire: bytes) -> None:
    text = wire.decode("latin-1")
    try:
        sas.check(text, [RULE], {"relay.example"}, "orders", "listen", 1_700_000_000.0)
    except sas.SasError as exc:
        check(exc.status in (401, 403), f"SasError with status {exc.status}")
        sig = text.partition("sig=")[2].partition("&")[0]
        check(len(sig) < 8 or sig not in str(exc), "the refusal quotes the signature")


if __name__ == "__main__":
    harness.main(test_one_input)
