"""Crockford's base32: the one spelling of the codes people type (OTPs,
claim codes).

The alphabet leaves out I, L, O and U; what people type for them is read as
1 and 0, case does not matter, and hyphens and spaces are free. A code is
stored and compared only in its canonical form (upper case, no separators).
"""

from __future__ import annotations

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: c for c in ALPHABET} | {"O": "0", "I": "1", "L": "1"}
#: Longer input is refused before it is looked at (no code is near this long).
MAX_TYPED = 64


def encode(n: int, chars: int) -> str:
    """The low ``5 * chars`` bits of ``n``, most significant first."""
    return "".join(ALPHABET[(n >> (5 * i)) & 31] for i in reversed(range(chars)))


def encode_bytes(raw: bytes) -> str:
    """``raw`` (a multiple of 5 bits long) as base32, most significant first."""
    return encode(int.from_bytes(raw, "big"), len(raw) * 8 // 5)


def normalize(text, length: int) -> str | None:
    """A code as typed, in its canonical ``length`` characters; None if it
    cannot be one (not a string, too long, a character outside the
    alphabet, or the wrong length)."""
    if not isinstance(text, str) or len(text) > MAX_TYPED:
        return None
    out = []
    for c in text.upper():
        if c in "- ":
            continue
        d = _DECODE.get(c)
        if d is None:
            return None
        out.append(d)
    return "".join(out) if len(out) == length else None
