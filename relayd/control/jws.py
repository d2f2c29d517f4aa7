"""relayd's own tokens (issue 12): compact JWS (RFC 7515) signed with
Ed25519 (``alg: EdDSA``), header exactly ``{alg, typ, kid}`` with an
explicit ``typ`` (RFC 8725 3.11), read strictly
(``../shared/specs/zero-trust.md`` section 4).

``verify`` checks, in this order, and refuses with a TokenError whose
``reason`` names the first failure (the metric label; never the token):
size, three parts of strict base64url (no padding, no ``+/``), the header's
keys, ``alg``, ``typ``, ``kid`` among the pinned keys, the signature, then
strict JSON (UTF-8, no duplicate keys, nesting at most 8 deep, integer
times). What the claims must say (issuer, audience, subject, times against
the clock) is the caller's, with ``check_window`` for the times.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relayd.errors import AuthError

#: Token types (``typ``).
CLAIMS = "relayd-claims+jwt"
ENTITLEMENTS = "relayd-entitlements+jwt"
ADMIN = "relayd-admin+jwt"
#: A device's token for the device gateway (relayd.control.devicegw).
DEVICE = "relayd-device+jwt"
#: A user's token for the device proxy (relayd.control.deviceproxy).
PROXY = "relayd-proxy+jwt"
#: A user of relayd's own directory, for the device API (relayd.control.devices).
USER = "relayd-user+jwt"
#: Largest tokens accepted, by type.
MAX_SIZE = {CLAIMS: 16 * 1024, ENTITLEMENTS: 256 * 1024, ADMIN: 16 * 1024, DEVICE: 4 * 1024, PROXY: 16 * 1024,
            USER: 8 * 1024}
MAX_DEPTH = 8
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_TIMES = ("iat", "nbf", "exp")


class TokenError(AuthError):
    """A token refused; ``reason`` is the metric label."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    if not _B64URL.match(part) or len(part) % 4 == 1:
        raise TokenError("malformed", "a token part is not strict base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def key_id(public: Ed25519PublicKey) -> str:
    """``base64url(SHA-256(raw public key))[:16]``."""
    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _b64(hashlib.sha256(raw).digest())[:16]


def sign(payload: dict, typ: str, key: Ed25519PrivateKey) -> str:
    if typ not in MAX_SIZE:
        raise ValueError(f"unknown token type {typ!r}")
    header = _b64(orjson.dumps({"alg": "EdDSA", "typ": typ, "kid": key_id(key.public_key())}))
    body = _b64(orjson.dumps(payload))
    signing_input = f"{header}.{body}".encode()
    token = f"{header}.{body}.{_b64(key.sign(signing_input))}"
    if len(token) > MAX_SIZE[typ]:
        raise ValueError(f"a {typ} token of {len(token)} bytes is over the {MAX_SIZE[typ]}-byte limit")
    return token


def verify(token, typ: str, keys: dict) -> dict:
    """The payload of ``token`` if it is a good ``typ`` token signed by one
    of ``keys`` (kid -> Ed25519PublicKey); TokenError otherwise."""
    if not isinstance(token, str) or len(token) > MAX_SIZE[typ]:
        raise TokenError("too_large", f"the token is not a string of at most {MAX_SIZE[typ]} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed", "a token has three parts")
    raw = [_unb64(part) for part in parts]  # every part strict base64url, before anything is read
    header = _strict_json(raw[0], "bad_header")
    if not isinstance(header, dict) or set(header) != {"alg", "typ", "kid"}:
        raise TokenError("bad_header", "the header must have exactly alg, typ and kid")
    if header["alg"] != "EdDSA":
        raise TokenError("alg", "the token is not signed with EdDSA")
    if header["typ"] != typ:
        raise TokenError("typ", f"the token is not a {typ}")
    public = keys.get(header["kid"]) if isinstance(header["kid"], str) else None
    if public is None:
        raise TokenError("kid", "the token's key is not one of the controller's")
    try:
        public.verify(raw[2], f"{parts[0]}.{parts[1]}".encode())
    except InvalidSignature:
        raise TokenError("signature", "the token's signature is not valid") from None
    payload = _strict_json(raw[1], "json")
    if not isinstance(payload, dict):
        raise TokenError("json", "the token's payload is not an object")
    for name in _TIMES:
        if name in payload and (type(payload[name]) is not int):
            raise TokenError("json", f"the token's {name} is not an integer")
    return payload


def check_window(payload: dict, now: float, before: int = 60, after: int = 30) -> None:
    """``nbf - before <= now < exp + after``, as the gateway checks."""
    nbf, exp = payload.get("nbf"), payload.get("exp")
    if type(nbf) is not int or type(exp) is not int:
        raise TokenError("time", "the token needs integer nbf and exp")
    if now < nbf - before:
        raise TokenError("not_yet_valid", "the token is not valid yet")
    if now >= exp + after:
        raise TokenError("expired", "the token has expired")


def _strict_json(data: bytes, reason: str):
    def no_duplicates(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise TokenError(reason, "duplicate key in the token's JSON")
            out[k] = v
        return out

    try:
        doc = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates,
                         parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    except TokenError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenError(reason, "the token's JSON is malformed") from None
    if _depth(doc) > MAX_DEPTH:
        raise TokenError(reason, f"the token's JSON nests deeper than {MAX_DEPTH}")
    return doc


def _depth(doc, level: int = 0) -> int:
    """How deep objects and arrays nest (a scalar: 0), counted up to one
    past MAX_DEPTH."""
    if isinstance(doc, (dict, list)):
        level += 1
        if level > MAX_DEPTH:
            return level
        return max((_depth(v, level) for v in (doc.values() if isinstance(doc, dict) else doc)), default=level)
    return level
