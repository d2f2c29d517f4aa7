"""Fuzz relayd's reading of an ACME server's answers
(relayd/control/acme.py). Pure Python only.

The wire bytes are one answer's body; the low three bits of the mode say
which document it is read as: 0 a failure answer (``problem_of``; mode bit 3:
with a JSON content type), 1 the directory, 2 an order, 3 an
authorization, 4 a Retry-After value, 5 a certificate chain, 6 the error
object inside an order or a challenge (``error_of``), 7 the directory with
the wire bytes inserted before the closing brace of a real one (so that
its fields are overridden and added to).

Oracles: nothing but ``AcmeError`` escapes, with a kind from the bounded
set (a problem type's short name, "other", or a local kind) and a message
that is one printable line of bounded length; what is accepted is typed:
URLs are https:// without blanks, statuses are the documented ones, an
authorization's name is a DNS name and each challenge's token base64url, a
Retry-After a finite delay of at least zero, a chain 1 to 10 certificates.

    python fuzz/fuzz_acme.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import math
import os
import re
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import acme

KINDS = acme.PROBLEM_TYPES | acme.LOCAL_KINDS | {"other"}
_URL = re.compile(r"(?i:https)://[\x21-\x7e]+\Z")  # a scheme is case-insensitive (RFC 3986 3.1)
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}\Z")
DIRECTORY = (b'{"newNonce": "https://ca.test/nonce", "newAccount": "https://ca.test/acct", '
             b'"newOrder": "https://ca.test/order", "meta": {"termsOfService": "https://ca.test/tos"}}')


def _url(v) -> None:
    check(v is None or (isinstance(v, str) and _URL.match(v) is not None), f"accepted URL {v!r:.80}")


def _error_ok(exc: acme.AcmeError) -> None:
    text = str(exc)
    check(exc.kind in KINDS, f"undocumented kind {exc.kind!r}")
    check(text.isprintable() and len(text) <= 6000, f"message not one bounded printable line: {text[:120]!r}")


def _read(mode: int, wire: bytes):
    kind = mode & 7
    if kind == 0:
        ctype = "application/problem+json" if mode & 8 else "text/html"
        p = acme.problem_of(400 + (mode >> 4), ctype, wire, "newOrder")
        check(isinstance(p, acme.AcmeProblem), "problem_of gave no problem")
        _error_ok(p)
        check(len(p.subproblems) <= 10, "too many subproblems kept")
        return
    if kind == 4:
        d = acme.parse_retry_after(wire.decode("latin-1"), 1_000_000.0)
        check(d is None or (math.isfinite(d) and d >= 0), f"retry after {d!r}")
        return
    if kind == 5:
        chain = acme.parse_chain(wire)
        check(1 <= len(chain) <= 10, "chain length")
        return
    if kind == 6:
        import json

        try:
            doc = json.loads(wire)
        except (ValueError, RecursionError):
            return
        e = acme.error_of(doc, "order")
        if e is not None:
            _error_ok(e)
        return
    doc = acme.parse_json(DIRECTORY[:-1] + wire + b"}" if kind == 7 else wire, "answer")
    if kind in (1, 7):
        d = acme.parse_directory(doc)
        for u in (d.new_nonce, d.new_account, d.new_order):
            _url(u)
    elif kind == 2:
        o = acme.parse_order(doc)
        check(o.status in acme.ORDER_STATUSES, "order status")
        for u in o.authorizations + (o.finalize, o.certificate):
            _url(u)
        check(o.status != "valid" or o.certificate is not None, "a valid order without a certificate")
        if o.error is not None:
            _error_ok(o.error)
    elif kind == 3:
        a = acme.parse_authorization(doc)
        check(a.status in acme.AUTHZ_STATUSES and acme.is_dns_name(a.name), "authorization")
        for c in a.challenges:
            check(c.type in acme.CHALLENGES and c.status in acme.CHALLENGE_STATUSES, "challenge type or status")
            check(isinstance(c.token, str) and _TOKEN.match(c.token) is not None, f"token {c.token!r:.60}")
            _url(c.url)


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    wire = b"".join(chunk for _, chunk, _ in script.reads())
    try:
        _read(script.mode, wire)
    except acme.AcmeError as exc:
        _error_ok(exc)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc!r}"[:300]) from exc


if __name__ == "__main__":
    harness.main(test_one_input)
