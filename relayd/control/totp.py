"""Time-based one-time passwords (RFC 6238 over RFC 4226's HOTP): the
second factor of relayd's own user directory and of step-up.

SHA-1, 6 digits, 30-second steps: what every authenticator app shows for an
``otpauth://totp/`` URI. ``verify`` accepts the step before and after the
current one (clock drift, RFC 6238 section 5.2) and returns the step it
matched, so that the caller can refuse a step already used (section 5.2:
"the verifier MUST NOT accept the second attempt of the same OTP"). The
tests check the codes against an independent library (pyotp).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

STEP = 30
DIGITS = 6
#: Steps accepted on each side of the current one.
WINDOW = 1


def new_secret() -> str:
    """A new shared secret: 160 random bits (RFC 4226's recommended
    length), base32 without padding as authenticator apps take it."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def _key(secret: str) -> bytes:
    s = secret.strip().replace(" ", "").upper()
    return base64.b32decode(s + "=" * (-len(s) % 8))


def code_at(secret: str, step: int) -> str:
    """The code of time step ``step`` (RFC 4226 section 5.3's dynamic
    truncation)."""
    mac = hmac.new(_key(secret), struct.pack(">Q", step), hashlib.sha1).digest()
    off = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** DIGITS).zfill(DIGITS)


def verify(secret: str, code, now: float, last_step: int = 0) -> int | None:
    """The time step ``code`` belongs to (within WINDOW of ``now``), if it
    is later than ``last_step`` (the last one used); None otherwise. Every
    candidate is compared in constant time."""
    if not isinstance(code, str) or len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    current = int(now // STEP)
    found = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        if hmac.compare_digest(code_at(secret, step), code) and step > last_step and found is None:
            found = step
    return found


def provisioning_uri(secret: str, account: str, issuer: str = "relayd") -> str:
    """The ``otpauth://`` URI an authenticator app scans."""
    label = quote(f"{issuer}:{account}", safe="")
    return f"otpauth://totp/{label}?" + urlencode({"secret": secret, "issuer": issuer, "algorithm": "SHA1",
                                                  "digits": DIGITS, "period": STEP})
