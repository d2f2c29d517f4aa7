"""The WebSocket opening handshake (RFC 6455 section 4), sans-I/O.

Works on HTTP heads that are already parsed (relayd.core.http1 parses them;
this module never reads bytes off a connection): a request as ``method``,
``target`` and a list of ``(name, value)`` header fields, a response as its
status code and fields. Names and values may be bytes (as the head parser
gives them) or str.

Server: ``server_handshake`` checks an upgrade request and returns either
``Accept`` (the 101 response to write, the chosen subprotocol) or ``Refuse``
(the status and reason to answer with; 426 carries the version header RFC
6455 4.4 asks for). Client: ``client_handshake`` makes the request and a
``ClientHandshake`` whose ``check`` verifies the server's reply
(``Sec-WebSocket-Accept`` among others) or raises ``InvalidHandshake``.

No extension is ever negotiated (relayd's frames have no reserved bits);
subprotocols are, when the caller offers some.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass

from relayd.errors import InvalidHandshake

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    if isinstance(key, str):
        key = key.encode("latin-1")
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


def _b(x) -> bytes:
    return x.encode("latin-1") if isinstance(x, str) else bytes(x)


def _values(headers, name: bytes) -> list[bytes]:
    """Every value of field ``name`` (case-insensitive), in order."""
    return [_b(v).strip() for n, v in headers if _b(n).lower() == name]


def _tokens(headers, name: bytes) -> list[bytes]:
    """A comma-separated list field (Connection, Upgrade, Sec-WebSocket-Protocol),
    all its fields together, as lower-case tokens (protocols keep their case)."""
    out = []
    for v in _values(headers, name):
        out += [t.strip() for t in v.split(b",") if t.strip()]
    return out


def _lower(tokens: list[bytes]) -> list[bytes]:
    return [t.lower() for t in tokens]


# --- server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accept:
    """The handshake succeeded: write ``response``; the WebSocket starts after it."""

    response: bytes
    key: str
    #: The subprotocol chosen (one the client offered), or None.
    subprotocol: str | None = None


@dataclass(frozen=True)
class Refuse:
    """The request is no acceptable upgrade: answer ``status`` (with
    ``headers``) and close. ``reason`` says why, for the body and the log."""

    status: int
    reason: str
    headers: tuple = ()


def server_handshake(method, target, headers, *, subprotocols=(), extra_headers=()) -> Accept | Refuse:
    """Check an upgrade request (RFC 6455 4.2.1) given as a parsed head.

    ``subprotocols``: the ones we speak; the first the client offered among
    them is chosen, in the client's order (as hyco-ws and .NET listeners
    do); none is chosen if the client offered none we speak, and the client
    decides whether that will do.
    ``extra_headers``: more ``(name, value)`` fields for the 101 response.
    """
    if _b(method) != b"GET":
        return Refuse(400, "a WebSocket upgrade is a GET")
    if not _b(target).startswith(b"/"):
        return Refuse(400, "a WebSocket upgrade needs an origin-form target")
    if len(_values(headers, b"host")) != 1:
        return Refuse(400, "a WebSocket upgrade needs one Host field")
    if b"websocket" not in _lower(_tokens(headers, b"upgrade")):
        return Refuse(400, "expected a WebSocket upgrade (Upgrade: websocket)")
    if b"upgrade" not in _lower(_tokens(headers, b"connection")):
        return Refuse(400, "expected a WebSocket upgrade (Connection: Upgrade)")
    keys = _values(headers, b"sec-websocket-key")
    try:
        key_ok = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except (binascii.Error, ValueError):
        key_ok = False
    if not key_ok:
        return Refuse(400, "expected a WebSocket upgrade with one Sec-WebSocket-Key of 16 bytes")
    versions = _values(headers, b"sec-websocket-version")
    if versions != [b"13"]:
        # 4.4: tell the client which version we speak.
        return Refuse(426 if versions else 400, "expected a WebSocket upgrade (version 13)",
                      ((b"Sec-WebSocket-Version", b"13"),))
    key = keys[0].decode("latin-1")
    chosen = None
    for t in _tokens(headers, b"sec-websocket-protocol"):
        if t.decode("latin-1") in subprotocols:
            chosen = t.decode("latin-1")
            break
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Accept: " + accept_key(key).encode()]
    if chosen is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + chosen.encode("latin-1"))
    for name, value in extra_headers:
        lines.append(_b(name) + b": " + _b(value))
    return Accept(b"\r\n".join(lines) + b"\r\n\r\n", key, chosen)


# --- client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientHandshake:
    """Our upgrade request and what the reply must match."""

    request: bytes
    key: str
    subprotocols: tuple = ()

    def check(self, status: int, headers) -> str | None:
        """Verify the server's reply (RFC 6455 4.1); returns the subprotocol
        it chose (None if none), or raises InvalidHandshake."""
        if status != 101:
            raise InvalidHandshake(f"the server answered {status}, not 101")
        if b"websocket" not in _lower(_tokens(headers, b"upgrade")):
            raise InvalidHandshake("the server's 101 has no Upgrade: websocket")
        if b"upgrade" not in _lower(_tokens(headers, b"connection")):
            raise InvalidHandshake("the server's 101 has no Connection: Upgrade")
        if _values(headers, b"sec-websocket-accept") != [accept_key(self.key).encode()]:
            raise InvalidHandshake("the server's Sec-WebSocket-Accept does not match our key")
        if _values(headers, b"sec-websocket-extensions"):
            raise InvalidHandshake("the server chose an extension; none was offered")
        chosen = _tokens(headers, b"sec-websocket-protocol")
        if not chosen:
            return None
        proto = chosen[0].decode("latin-1")
        if len(chosen) != 1 or proto not in self.subprotocols:
            raise InvalidHandshake("the server chose a subprotocol that was not offered")
        return proto


def client_handshake(host: str, target: str = "/", *, subprotocols=(), extra_headers=(),
                     key: str | None = None) -> ClientHandshake:
    """The upgrade request for ``target`` on ``host`` (``Host`` as given:
    with the port when it is not the scheme's default)."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode()
    lines = [b"GET " + _b(target) + b" HTTP/1.1", b"Host: " + _b(host), b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Key: " + key.encode(), b"Sec-WebSocket-Version: 13"]
    if subprotocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode("latin-1"))
    for name, value in extra_headers:
        lines.append(_b(name) + b": " + _b(value))
    return ClientHandshake(b"\r\n".join(lines) + b"\r\n\r\n", key, tuple(subprotocols))
