"""Fuzz the device API's user check and the codes people type
(relayd/control/devices.py, relayd/control/crockford.py). Pure Python only.

Mode bit 0 clear: the wire bytes are an ``Authorization`` header's value
(mode bit 1: ``Bearer `` is put first; mode bit 2: a token of relayd's own
directory, signed by the pinned key, is put first, so that mutations of a
valid token are explored). ``UserAuth.authenticate`` reads it with no OIDC
provider configured. Mode bit 0 set: the wire bytes, as text, are a claim
code and an OTP as typed.

Oracles: nothing but ``ApiError`` escapes ``authenticate``, always a 401
``unauthorized`` with a documented reason counted and a message that quotes
no token; a user comes back only for a token that verifies under the pinned
key, for the device API, inside its times, and the same token gives the
same user again. The issuer peek never raises and gives None or a short
string. A normalized code is None or its length in the alphabet, a fixed
point, and the same whatever hyphens, spaces and case it was typed with.

    python fuzz/fuzz_usertoken.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import crockford, devices, jws
    from relayd.control.provisioning import OTP_LENGTH, canonical

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from relayd import metrics  # noqa: E402
from relayd.control.api import ApiError  # noqa: E402
from relayd.control.store import Store  # noqa: E402

# A fixed key and clock, so that an input replays the same way.
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = 1_800_000_000
REASONS = {"missing", "malformed", "issuer", "too_large", "bad_header", "alg", "typ", "kid", "signature", "json",
           "audience", "expired", "not_yet_valid", "time"}
_DIR = Path(tempfile.mkdtemp(prefix="relayd-fuzz-usertoken-"))
atexit.register(shutil.rmtree, _DIR, True)
STORE = Store(_DIR / "relayd.db")
AUTH = devices.UserAuth(devices.DeviceStore(STORE), {}, KEY, clock=lambda: NOW)
GOOD = jws.sign({"iss": AUTH.issuer, "aud": devices.USER_AUDIENCE, "sub": "alice", "iat": NOW, "nbf": NOW,
                 "exp": NOW + devices.USER_TOKEN_TTL, "jti": "fuzz", "email": "alice@example.test"}, devices.USER_TOKEN, KEY)


class Head(dict):
    """The parsed head's header lookup (lower-case byte names)."""


def refusals(reason: str) -> float:
    return metrics.USER_AUTH_REFUSALS.labels(reason)._value.get()


def check_token(value: bytes) -> None:
    head = Head({b"authorization": value})
    token = value.strip()
    if token[:7].lower() == b"bearer ":
        token = token[7:].strip()
    before = {r: refusals(r) for r in REASONS}
    try:
        user = AUTH.authenticate(head)
    except ApiError as exc:
        check(exc.status == 401 and exc.code == "unauthorized", f"refused with {exc.status} {exc.code}")
        counted = [r for r in REASONS if refusals(r) == before[r] + 1]
        check(len(counted) == 1, f"a refusal counted under {counted} (documented: {sorted(REASONS)})")
        check(len(token) < 16 or token[:16].decode("latin-1") not in str(exc), "the message quotes the token")
        return
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"authenticate: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    text = token.decode("ascii")
    claims = jws.verify(text, devices.USER_TOKEN, AUTH.keys)  # raises (a finding) if it should not have passed
    check(claims.get("aud") == devices.USER_AUDIENCE and claims.get("iss") == AUTH.issuer, "a foreign token passed")
    check(claims.get("nbf", 0) - 30 <= NOW < claims.get("exp", 0), "a token outside its times passed")
    check(isinstance(user, dict) and str(user.get("id", "")).startswith("usr_"), f"no user profile: {user!r}")
    check(AUTH.authenticate(head)["id"] == user["id"], "the same token gave another user")


def check_codes(text: str) -> None:
    iss = devices._peek_issuer(text)
    check(iss is None or isinstance(iss, str) and 0 < len(iss) <= 512, f"issuer peek gave {iss!r}")
    for length, normalize in ((16, devices.normalize_code), (OTP_LENGTH, canonical)):
        code = normalize(text)
        if code is None:
            continue
        check(len(code) == length and set(code) <= set(crockford.ALPHABET), f"not a canonical code: {code!r}")
        check(normalize(code) == code, "normalizing is not a fixed point")
        spaced = "-".join(code[i:i + 4] for i in range(0, length, 4)).lower()
        check(normalize(spaced) == code, "the grouped, lower-case spelling reads differently")


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    wire = b"".join(chunk for _, chunk, _ in script.reads())
    if script.mode & 1:
        check_codes(wire.decode("utf-8", "replace"))
        return
    if script.mode & 4:
        wire = GOOD.encode() + wire
    if script.mode & 2:
        wire = b"Bearer " + wire
    check_token(wire)


if __name__ == "__main__":
    harness.main(test_one_input)
