"""Join tokens (kubeadm/k3s style).

A join token is everything an agent needs to enroll, in one pasteable line::

    relayd1.<base64url, no padding, of msgpack {"a": addr, "p": pin, "i": id, "s": secret}>

``a`` is the relay's agent address (``host:port``), ``p`` the SHA-256 pin of
the relay's CA certificate (so the agent can authenticate the relay before it
trusts anything the relay says), ``i`` the token id the relay looks the token
up by, and ``s`` the single-use secret; the relay stores only its hash.

Decoding is strict (exact field set, types, lengths, canonical base64) and
every failure is an ``AuthError`` whose message says what was wrong but never
repeats the token's content: a token pasted into the wrong place must not
leak its secret into a log.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

import msgpack

from relayd.config import parse_hostport
from relayd.errors import AuthError, ConfigError

__all__ = ["PREFIX", "JoinToken"]

PREFIX = "relayd1."
#: Far above any real token (~150 characters); bounds the work of decoding.
MAX_TOKEN_LENGTH = 2048

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_TOKEN_ID_RE = re.compile(r"[A-Za-z0-9_-]{8,16}\Z")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{32,256}\Z")
_PIN_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_FIELDS = ("a", "p", "i", "s")


def _malformed(reason: str) -> AuthError:
    return AuthError(f"malformed join token: {reason}")


@dataclass(frozen=True)
class JoinToken:
    """The content of a join token; ``repr`` never shows the secret."""

    address: str
    pin: str
    token_id: str
    secret: str = field(repr=False)

    def _problem(self) -> str | None:
        """Why this token is invalid (never quoting the secret), or None."""
        for name in ("address", "pin", "token_id", "secret"):
            if not isinstance(getattr(self, name), str):
                return f"{name} must be a string"
        try:
            _, port = parse_hostport(self.address, "join token address", need_host=True)
        except ConfigError:
            return "bad relay address"
        if port == 0:
            return "relay address has port 0"
        if not _PIN_RE.match(self.pin):
            return "pin must be sha256: followed by 64 lowercase hex digits"
        if not _TOKEN_ID_RE.match(self.token_id):
            return "token id must be 8-16 URL-safe characters"
        if not _SECRET_RE.match(self.secret):
            return "secret must be 32-256 URL-safe characters"
        return None

    def encode(self) -> str:
        """The token text, ``relayd1.`` + base64url(msgpack)."""
        problem = self._problem()
        if problem is not None:
            raise ConfigError(f"cannot encode join token: {problem}")
        packed = msgpack.packb(
            {"a": self.address, "p": self.pin, "i": self.token_id, "s": self.secret}
        )
        return PREFIX + base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse token text; AuthError("malformed join token: ...") if invalid."""
        if not isinstance(text, str):
            raise _malformed("not a string")
        # Tolerate what copy and paste adds around a token, nothing inside it.
        text = text.strip()
        if len(text) > MAX_TOKEN_LENGTH:
            raise _malformed("too long")
        if not text.startswith(PREFIX):
            raise _malformed(f"does not start with {PREFIX}")
        body = text[len(PREFIX) :]
        if not _B64URL_RE.match(body) or len(body) % 4 == 1:
            raise _malformed("bad base64url encoding")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise _malformed("bad base64url encoding") from None
        # One token, one spelling: unused trailing bits would make variants.
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != body:
            raise _malformed("non-canonical base64url encoding")
        try:
            obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
        except Exception:
            # msgpack raises a zoo of types (ExtraData, FormatError, StackError,
            # ValueError, TypeError...) for hostile input; all mean the same.
            raise _malformed("bad msgpack content") from None
        if not isinstance(obj, dict):
            raise _malformed("content is not a map")
        missing = [k for k in _FIELDS if k not in obj]
        if missing:
            raise _malformed("missing field(s) " + ", ".join(missing))
        if len(obj) != len(_FIELDS):
            raise _malformed("unexpected field(s)")
        token = cls(address=obj["a"], pin=obj["p"], token_id=obj["i"], secret=obj["s"])
        problem = token._problem()
        if problem is not None:
            raise _malformed(problem)
        return token
