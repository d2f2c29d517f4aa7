"""Fuzz relayd's token reader (relayd/control/jws.py). Pure Python only.

The wire bytes are a token as a client presents it. Mode bit 0: a token
signed by the pinned key is put first, so that mutations of a valid token
are explored.

Oracles: nothing but ``TokenError`` escapes ``verify``; a reason is one of
the documented ones; an accepted token's payload is an object with integer
times, which signed again under the same key verifies to the same payload.

    python fuzz/fuzz_jws.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import jws

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

# A fixed key, so that an input replays the same way.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {jws.key_id(KEY.public_key()): KEY.public_key()}
REASONS = {"too_large", "malformed", "bad_header", "alg", "typ", "kid", "signature", "json"}
GOOD = jws.sign({"sub": "CN=a", "iat": 1, "nbf": 0, "exp": 2, "user": {"groups": ["x"]}}, jws.CLAIMS, KEY)


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    wire = b"".join(chunk for _, chunk, _ in script.reads())
    text = wire.decode("latin-1")
    if script.mode & 1:
        text = GOOD + text
    try:
        payload = jws.verify(text, jws.CLAIMS, KEYS)
    except jws.TokenError as exc:
        check(exc.reason in REASONS, f"undocumented reason {exc.reason!r}")
        return
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    check(isinstance(payload, dict), "an accepted payload is not an object")
    check(all(type(payload[t]) is int for t in ("iat", "nbf", "exp") if t in payload), "non-integer time")
    check(jws.verify(jws.sign(payload, jws.CLAIMS, KEY), jws.CLAIMS, KEYS) == payload, "re-signed payload differs")


if __name__ == "__main__":
    harness.main(test_one_input)
