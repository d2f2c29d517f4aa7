"""The zero-trust session's messages, read without a network: what a
client may say on its control stream and in a flow's request
(``../shared/specs/zero-trust.md`` sections 3 and 7), and the session's
limits on saying it.

Every message is one length-prefixed msgpack map (relayd.core.framing),
decoded before it gets here. ``control_message`` takes a control message
and returns its normal form: the fields the gateway reads, each of the type
it expects, and nothing else; ``flow_request`` does the same for a flow's
first message. Anything else raises ``MessageError``, whose ``reason`` is a
metric label (``relayd_bad_input_total{where="zt_session"|"zt_flow", kind}``)
and whose text is safe to send back and to log: it never quotes the input.

Only the shape is judged here. Tokens are the controller's to check
(``check_token``), device claims the session's (``device_claims``), and
whether a reason answers an open interaction of this session the
session's; a reason's text is refused here if it could not be one line of
a person's words (control characters, line breaks) or is too long.

Unknown keys in a known message are ignored, so that a newer client can
add fields; an unknown message type is refused.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from relayd.control import jws
from relayd.control import policy as pol
from relayd.errors import ProtocolError

#: One control message: a hello carries an entitlement token (256 KiB at
#: most) and a claims token, with room for the device report and reasons.
MAX_CONTROL = jws.MAX_SIZE[jws.ENTITLEMENTS] + 64 * 1024
#: One flow request.
MAX_FLOW_REQUEST = 4096
#: Seconds from the WebSocket upgrade to the hello, and from a flow
#: stream's opening to its request.
HELLO_TIMEOUT = 10.0
FLOW_REQUEST_TIMEOUT = 10.0
#: Cached reasons one hello may carry.
MAX_REASONS = 32
#: A renewed session certificate (PEM).
MAX_CERTIFICATE = 16 * 1024
#: Control messages after the hello: a bucket of UPDATE_BURST messages,
#: refilled at UPDATE_RATE a second (a client sends a few an hour).
UPDATE_RATE = 5.0
UPDATE_BURST = 20
#: Refused control messages after which the session is closed.
MAX_REFUSED = 32
#: Token ids of one session remembered as replaced (rollback refusal).
MAX_SUPERSEDED = 256

_HEX128 = re.compile(r"[0-9a-f]{32}\Z")
_UPDATES = ("tokens", "claims", "entitlements", "device", "reason", "ping")
#: Characters a reason may not hold: controls (C0, DEL, C1, so also line
#: breaks and tabs) and the Unicode line and paragraph separators.
_NOT_IN_REASON = frozenset(("Cc", "Zl", "Zp"))


class MessageError(ProtocolError):
    """A control message or flow request refused; ``reason`` is its label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def control_message(m: dict, hello_done: bool) -> dict:
    """The normal form of control message ``m`` (a decoded map): a hello
    before ``hello_done``, an update after it."""
    t = m.get("type")
    if not hello_done:
        if t != "hello":
            raise MessageError("bad_hello", "the first message must be hello")
        return _hello(m)
    if not isinstance(t, str) or t not in _UPDATES:
        if t == "hello":
            raise MessageError("unexpected_message", "this session has said hello already")
        raise MessageError("unknown_message", "unknown message type")
    if t in ("tokens", "claims", "entitlements"):
        out = {"type": t, "claims": None, "entitlements": None, "certificate": None}
        keys = ("claims", "entitlements") if t == "tokens" else (t,)
        for k in keys:
            v = m.get(k)
            if v is not None and not isinstance(v, str):
                raise MessageError("bad_message", f"{t}: '{k}' must be a token (a string)")
            out[k] = v
        if out["claims"] is None and out["entitlements"] is None:
            raise MessageError("bad_message", f"{t}: no token")
        if t == "tokens":
            cert = m.get("certificate")
            if cert is not None and (not isinstance(cert, str) or len(cert) > MAX_CERTIFICATE):
                raise MessageError("bad_message", "tokens: 'certificate' must be a PEM certificate")
            out["certificate"] = cert
        return out
    if t == "device":
        claims = m.get("claims")
        if not isinstance(claims, dict):
            raise MessageError("bad_message", "device: 'claims' must be an object")
        return {"type": t, "claims": claims}
    if t == "reason":
        iid = m.get("interaction")
        if not isinstance(iid, str) or not _HEX128.match(iid):
            raise MessageError("bad_message", "reason: 'interaction' must name the interaction it answers")
        return {"type": t, "interaction": iid, "suffix": _suffix(m.get("suffix")), "text": reason_text(m.get("text"))}
    return {"type": t}


def _hello(m: dict) -> dict:
    out = {"type": "hello"}
    for k in ("claims", "entitlements"):
        if not isinstance(m.get(k), str):
            raise MessageError("bad_hello", f"hello: '{k}' must be a token (a string)")
        out[k] = m[k]
    device = m.get("device", {})
    if not isinstance(device, dict):
        raise MessageError("bad_hello", "hello: 'device' must be an object")
    out["device"] = device
    reasons = m.get("reasons", [])
    if not isinstance(reasons, list) or len(reasons) > MAX_REASONS:
        raise MessageError("bad_hello", f"hello: 'reasons' must be a list of at most {MAX_REASONS}")
    out["reasons"] = []
    for r in reasons:
        if not isinstance(r, dict):
            raise MessageError("bad_hello", "hello: each reason is an object")
        at = r.get("at")
        if not isinstance(at, int) or isinstance(at, bool):
            raise MessageError("bad_hello", "hello: a reason's 'at' must be a time (integer seconds)")
        out["reasons"].append({"suffix": _suffix(r.get("suffix")), "text": reason_text(r.get("text")), "at": at})
    return out


def _suffix(v) -> str:
    if not isinstance(v, str) or not pol._SUFFIX.match(v):
        raise MessageError("bad_message", "a reason's suffix is 1-64 of A-Z a-z 0-9 . _ -")
    return v


def reason_text(v) -> str:
    """A reason as a person types it: one line of at most MAX_REASON
    characters; never anything a log or a terminal would take as control."""
    if not isinstance(v, str):
        raise MessageError("bad_reason", "a reason must be text")
    if len(v) > pol.MAX_REASON:
        raise MessageError("reason_too_long", f"a reason is at most {pol.MAX_REASON} characters")
    if any(unicodedata.category(ch) in _NOT_IN_REASON for ch in v):
        raise MessageError("bad_reason", "a reason is one line without control characters")
    return v


def flow_request(m: dict) -> tuple[str, str, int, bool]:
    """``(proto, host, port, is_name)`` of a flow request (a decoded map):
    ``host`` is an address in its usual text (IPv4-mapped IPv6 as IPv4),
    or a host name in lower case without a final dot."""
    proto, host, port = m.get("proto"), m.get("host"), m.get("port")
    if proto != "tcp":
        raise MessageError("bad_request", "proto must be tcp")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise MessageError("bad_request", "port must be a number from 1 to 65535")
    if not isinstance(host, str) or not 0 < len(host) <= 253:
        raise MessageError("bad_request", "host must be an address or a host name")
    name = host.lower().rstrip(".")
    try:
        a = ipaddress.ip_address(name)  # "10.0.0.1." is that address too
    except ValueError:
        if not pol._is_name(name):
            raise MessageError("bad_request", "host must be an address or a host name") from None
        return proto, name, port, True
    if isinstance(a, ipaddress.IPv6Address):
        if a.scope_id is not None:
            # The gateway's interfaces are none of the client's business.
            raise MessageError("bad_request", "an address with a scope (zone) is not accepted")
        if a.ipv4_mapped is not None:
            a = a.ipv4_mapped
    return proto, str(a), port, False
