"""Fuzz relayd's EST request reader (relayd/control/est.py): what the relay
reads of a ``simpleenroll`` before it looks up an OTP. Pure Python only.

Reads that end with command 1 make the ``Authorization`` header's value,
with command 2 the ``Content-Type`` (default ``application/pkcs10``; mode
bit 0: none), the rest is the body. Mode bit 2: a valid CSR (with a
challengePassword) is put before the body, so that mutations of a real
request are explored.

Oracles: nothing but ``EstError`` escapes ``read_csr``, with 400 or 415 and
a documented reason, and its message never quotes the input; an accepted
CSR's signature verifies and its key is one a device may have; ``credential``
never raises and says where the OTP came from (or ``missing``); an OTP it
finds in a Basic header is what the header's password was.

    python fuzz/fuzz_est.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import base64
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.control import est
    from relayd.control.ca import key_allowed

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import AttributeOID, NameOID  # noqa: E402

# A fixed key, so that an input replays the same way.
KEY = ec.derive_private_key(0x5EED, ec.SECP256R1())
REASONS = {"media_type": 415, "empty": 400, "bad_csr": 400, "bad_base64": 400, "bad_signature": 400, "bad_key": 400}
HOWS = {"basic", "bearer", "challenge", "missing"}


def good_csr(password: str = "0123456789ABCDEFGHJKMNPQRS") -> bytes:
    """A valid CSR as base64 of its DER (one line)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")]))
           .add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
           .sign(KEY, hashes.SHA256(), ecdsa_deterministic=True))
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


GOOD = good_csr()


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    fields: dict = {1: None, 2: None}
    cur: list = []
    for _, chunk, command in script.reads():
        cur.append(chunk)
        if command in fields:
            fields[command], cur = b"".join(cur), []
    auth = fields[1]
    ctype = fields[2] if fields[2] is not None else (b"" if script.mode & 1 else b"application/pkcs10")
    body = (GOOD if script.mode & 4 else b"") + b"".join(cur)
    csr = None
    try:
        csr = est.read_csr(ctype, body)
    except est.EstError as exc:
        check(REASONS.get(exc.reason) == exc.status, f"undocumented refusal {exc.status} {exc.reason!r}")
        check(len(body) < 12 or body[:12] not in str(exc).encode(), "the message quotes the body")
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"read_csr: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    if csr is not None:
        check(csr.is_signature_valid, "a CSR with a bad signature was accepted")
        check(key_allowed(csr.public_key(), device=True), "a CSR with a key a device may not have was accepted")
    try:
        otp, how = est.credential(auth, csr)
    except Exception as exc:
        raise Finding(f"credential: {type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    check(how in HOWS, f"undocumented source {how!r}")
    check((otp is None) == (how == "missing"), "an OTP without a source, or a source without an OTP")
    check(otp is None or isinstance(otp, str) and otp != "", "an empty or non-text OTP")
    if how == "basic":
        scheme, _, rest = auth.strip().partition(b" ")
        decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        check(decoded.partition(":")[2] == otp, "the Basic password is not the OTP found")


if __name__ == "__main__":
    harness.main(test_one_input)
