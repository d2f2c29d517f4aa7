"""The typed link protocol between relay and agent, defined once.

A connection to the agents port starts with one request and one reply (the
preamble, relayd.net.preamble): ``CaRequest`` (bootstrap), ``EnrollRequest``
(a join token and a CSR), ``RenewRequest`` and ``TunnelRequest`` (the link
itself). Every request and reply carries the link protocol's version; a
refusal is a ``Refusal`` with a code from ``CODES`` (peers act on the code,
never on the text).

Every stream on an agent link starts with one ``StreamHeader`` (a
length-prefixed msgpack map, relayd.core.framing): the link protocol's
version, the stream's kind, its target, the trace id, and who is calling.
Either side may open streams: the relay opens ``tcp`` and ``http`` streams
toward an endpoint and ``control`` streams to push messages to the agent; a
side refuses (resets) a stream of a kind it does not take. A header of
another version is refused with a message naming both versions.

Sans-I/O: values and their (de)coding only; the readers live in
relayd.net (``MuxStream.read_message``).
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.core.framing import encode_message
from relayd.errors import AuthError, ProtocolError

#: The link protocol this build speaks.
LINK_VERSION = 1

KIND_TCP = "tcp"  # a byte stream to an endpoint's service
KIND_HTTP = "http"  # HTTP/1.1 exchanges with an endpoint's service
KIND_CONTROL = "control"  # messages between relay and agent
KIND_DIAL = "dial"  # a zero-trust flow: the agent of a site dials ``dest`` (an address the gateway checked)
KIND_PACKETS = "packets"  # zero-trust TUN mode: IP packets to and from ``dest`` (the client's tunnel address)
KINDS = frozenset({KIND_TCP, KIND_HTTP, KIND_CONTROL, KIND_DIAL, KIND_PACKETS})

_MAX_FIELD = 512


class WireError(ProtocolError):
    """A link message that does not follow the link protocol."""


class VersionMismatch(WireError):
    """The peer speaks another version of the link protocol."""

    code = "version"


def _text(m: dict, key: str, what: str, required: bool = True) -> str:
    v = m.get(key, None if required else "")
    if not isinstance(v, str) or len(v) > _MAX_FIELD:
        raise WireError(f"stream header: {what} must be a string of at most {_MAX_FIELD} characters")
    return v


def check_version(m: dict, what: str) -> None:
    v = m.get("v")
    if v != LINK_VERSION:
        raise VersionMismatch(
            f"{what} speaks link protocol {v!r}; this side speaks {LINK_VERSION}: "
            "run the same relayd version on relay and agent")


@dataclass(frozen=True)
class StreamHeader:
    """The first message on every stream."""

    kind: str
    target: str  # an endpoint name; "" for control streams
    trace: str
    client: str = ""  # the caller's address, as the way in saw it
    identity: str = ""  # who the caller is (a user, a device); "" if anonymous
    dest: str = ""  # dial streams: "IP PORT" (the address the gateway's filter admitted); packets: the client's IP

    def encode(self) -> bytes:
        m = {"v": LINK_VERSION, "k": self.kind, "t": self.target, "tr": self.trace, "c": self.client,
             "id": self.identity}
        if self.dest:
            m["d"] = self.dest
        return encode_message(m)

    @classmethod
    def decode(cls, m: dict) -> "StreamHeader":
        check_version(m, "the stream's opener")
        kind = _text(m, "k", "kind")
        if kind not in KINDS:
            raise WireError("stream header: a kind this side does not know")
        return cls(kind, _text(m, "t", "target"), _text(m, "tr", "trace"), _text(m, "c", "client", False),
                   _text(m, "id", "identity", False), _text(m, "d", "dest", kind in (KIND_DIAL, KIND_PACKETS)))


def control_message(type_: str, **fields) -> bytes:
    """One message on a control stream: a map with a ``type``."""
    return encode_message({"type": type_, **fields})


def control_type(m: dict) -> str:
    """The ``type`` of a control message (WireError if it has none)."""
    t = m.get("type")
    if not isinstance(t, str) or not 0 < len(t) <= 64:
        raise WireError("control message without a type")
    return t


# -- the preamble: one request, one reply --------------------------------------

#: Refusal codes. ``unavailable`` is the relay's own failure: nothing was
#: spent (a join token stays valid) and trying again later can succeed.
BAD_REQUEST = "bad_request"  # a request that does not follow this protocol
VERSION = "version"  # the peers speak different versions
UNAUTHORIZED = "unauthorized"  # a wrong, spent or expired token; no certificate
REVOKED = "revoked"  # the agent's certificate or identity is revoked
FORBIDDEN = "forbidden"  # a known agent asking for what it may not have
UNAVAILABLE = "unavailable"  # the relay failed; retry later
CODES = frozenset({BAD_REQUEST, VERSION, UNAUTHORIZED, REVOKED, FORBIDDEN, UNAVAILABLE})


class Refusal(AuthError):
    """A refused request, as the peer sent it: ``code`` and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def retry(self) -> bool:
        return self.code == UNAVAILABLE


def _strings(m: dict, *keys: str, what: str) -> list[str]:
    out = []
    for k in keys:
        v = m.get(k)
        if not isinstance(v, str) or len(v) > 16384:
            raise WireError(f"{what} request needs {', '.join(keys)}")
        out.append(v)
    return out


@dataclass(frozen=True)
class CaRequest:
    """Bootstrap: which CA is this relay's? (Nothing secret is sent.)"""

    op = "ca"

    def fields(self) -> dict:
        return {}

    @classmethod
    def from_fields(cls, m: dict) -> "CaRequest":
        return cls()


@dataclass(frozen=True)
class EnrollRequest:
    """A join token's id and secret with a CSR: a certificate, once."""

    token_id: str
    secret: str
    csr: str
    op = "enroll"

    def fields(self) -> dict:
        return {"id": self.token_id, "secret": self.secret, "csr": self.csr}

    @classmethod
    def from_fields(cls, m: dict) -> "EnrollRequest":
        return cls(*_strings(m, "id", "secret", "csr", what="enroll"))


@dataclass(frozen=True)
class RenewRequest:
    """A new certificate for the agent presenting its current one."""

    csr: str
    op = "renew"

    def fields(self) -> dict:
        return {"csr": self.csr}

    @classmethod
    def from_fields(cls, m: dict) -> "RenewRequest":
        return cls(*_strings(m, "csr", what="renew"))


@dataclass(frozen=True)
class TunnelRequest:
    """The link: this agent serves these endpoints."""

    endpoints: tuple[str, ...]
    op = "tunnel"

    def fields(self) -> dict:
        return {"endpoints": list(self.endpoints)}

    @classmethod
    def from_fields(cls, m: dict) -> "TunnelRequest":
        e = m.get("endpoints")
        if not isinstance(e, list) or len(e) > 1024 or not all(isinstance(x, str) and len(x) <= _MAX_FIELD for x in e):
            raise WireError("tunnel request needs a list of endpoints")
        return cls(tuple(e))


Request = CaRequest | EnrollRequest | RenewRequest | TunnelRequest
REQUESTS = {c.op: c for c in (CaRequest, EnrollRequest, RenewRequest, TunnelRequest)}
#: Requests whose success shows an identity (a join token or a certificate).
PROVING = frozenset({EnrollRequest.op, RenewRequest.op, TunnelRequest.op})


def encode_request(req: Request) -> dict:
    return {"v": LINK_VERSION, "op": req.op, **req.fields()}


def decode_request(m: dict) -> Request:
    """A request map -> its typed value; WireError (VersionMismatch) if it
    is not one this side takes."""
    check_version(m, "the agent")
    cls = REQUESTS.get(m.get("op"))  # type: ignore[arg-type]
    if cls is None:
        raise WireError("an unknown request")
    return cls.from_fields(m)


def ok_reply(**fields) -> dict:
    return {"v": LINK_VERSION, "ok": True, **fields}


def refusal_reply(code: str, message: str) -> dict:
    return {"v": LINK_VERSION, "ok": False, "code": code, "error": message}


def check_reply(m: dict) -> dict:
    """A reply map -> itself if it says ok; raises ``Refusal`` (with the
    relay's code) if it refuses, ``VersionMismatch`` if the relay speaks
    another version."""
    if m.get("v") != LINK_VERSION:
        msg = m.get("error") if m.get("code") == VERSION else None
        raise VersionMismatch(str(msg)[:300] if isinstance(msg, str) else
                              f"the relay speaks link protocol {m.get('v')!r}; this agent speaks {LINK_VERSION}: "
                              "run the same relayd version on relay and agent")
    if m.get("ok") is True:
        return m
    code = m.get("code")
    text = m.get("error")
    return_code = code if code in CODES else BAD_REQUEST
    raise Refusal(return_code, str(text)[:300] if isinstance(text, str) else "refused")
