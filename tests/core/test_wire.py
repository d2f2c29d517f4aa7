"""The typed link protocol: stream headers and control messages, defined
once, versioned, strict."""

import pytest

from relayd.core import framing, wire


def roundtrip(h: wire.StreamHeader) -> wire.StreamHeader:
    data = h.encode()
    msg, rest = framing.MessageReader().feed(data)
    assert rest == b""
    return wire.StreamHeader.decode(msg)


def test_header_roundtrip_every_kind():
    for kind in sorted(wire.KINDS):
        h = wire.StreamHeader(kind, "web", "abcd-1", "192.0.2.7:5555", "user:alice",
                              {wire.KIND_DIAL: "10.0.0.1 5432", wire.KIND_PACKETS: "100.96.0.2"}.get(kind, ""))
        assert roundtrip(h) == h
    assert roundtrip(wire.StreamHeader(wire.KIND_CONTROL, "", "t")).identity == ""
    # A zero-trust dial names where it goes, a packet stream whose packets
    # it carries; without that it is refused.
    for kind in (wire.KIND_DIAL, wire.KIND_PACKETS):
        with pytest.raises(wire.WireError):
            roundtrip(wire.StreamHeader(kind, "site:s", "t"))


def test_another_version_is_refused_naming_both():
    with pytest.raises(wire.VersionMismatch, match="speaks link protocol 2; this side speaks 1"):
        wire.StreamHeader.decode({"v": 2, "k": "tcp", "t": "web", "tr": "x"})
    with pytest.raises(wire.VersionMismatch, match="speaks link protocol None"):
        wire.StreamHeader.decode({"e": "web", "t": "x", "c": "1.2.3.4"})  # the old, unversioned header


@pytest.mark.parametrize("msg", [
    {"v": 1, "k": "ssh", "t": "web", "tr": "x"},
    {"v": 1, "k": "tcp", "t": 5, "tr": "x"},
    {"v": 1, "k": "tcp", "t": "web"},
    {"v": 1, "k": "tcp", "t": "x" * 600, "tr": "x"},
    {"v": 1, "k": "tcp", "t": "web", "tr": "x", "c": ["not", "text"]},
])
def test_bad_headers_are_wire_errors(msg):
    with pytest.raises(wire.WireError):
        wire.StreamHeader.decode(msg)


def test_control_messages():
    msg, _ = framing.MessageReader().feed(wire.control_message("claim", code="12345"))
    assert wire.control_type(msg) == "claim" and msg["code"] == "12345"
    for bad in ({}, {"type": ""}, {"type": 3}, {"type": "x" * 65}):
        with pytest.raises(wire.WireError):
            wire.control_type(bad)


@pytest.mark.parametrize("req", [
    wire.CaRequest(),
    wire.EnrollRequest("tok-1", "s3cret", "-----BEGIN CERTIFICATE REQUEST-----"),
    wire.RenewRequest("csr"),
    wire.TunnelRequest(("a", "b")),
])
def test_requests_roundtrip_through_the_one_decoder(req):
    msg, _ = framing.MessageReader().feed(framing.encode_message(wire.encode_request(req)))
    assert msg["v"] == wire.LINK_VERSION
    assert wire.decode_request(msg) == req


@pytest.mark.parametrize("msg,match", [
    ({"v": 1, "op": "enroll", "id": "x", "secret": 5, "csr": "c"}, "needs id, secret, csr"),
    ({"v": 1, "op": "renew"}, "needs csr"),
    ({"v": 1, "op": "tunnel", "endpoints": "web"}, "list of endpoints"),
    ({"v": 1, "op": "tunnel", "endpoints": [1]}, "list of endpoints"),
    ({"v": 1, "op": "exec"}, "unknown request"),
    ({"v": 1}, "unknown request"),
])
def test_malformed_requests_are_wire_errors(msg, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode_request(msg)


def test_a_request_of_another_version_names_both_versions():
    with pytest.raises(wire.VersionMismatch, match="the agent speaks link protocol None; this side speaks 1"):
        wire.decode_request({"op": "tunnel", "endpoints": []})  # an agent from before versions


def test_refusals_carry_codes_not_text():
    with pytest.raises(wire.Refusal) as e:
        wire.check_reply(wire.refusal_reply(wire.REVOKED, "agent x: certificate revoked or unknown"))
    assert e.value.code == wire.REVOKED and not e.value.retry
    # The code decides, whatever the text says.
    with pytest.raises(wire.Refusal) as e:
        wire.check_reply(wire.refusal_reply(wire.UNAUTHORIZED, "revoked revoked"))
    assert e.value.code == wire.UNAUTHORIZED
    with pytest.raises(wire.Refusal) as e:
        wire.check_reply(wire.refusal_reply(wire.UNAVAILABLE, "disk full"))
    assert e.value.retry
    with pytest.raises(wire.Refusal) as e:  # a code this side does not know
        wire.check_reply({"v": 1, "ok": False, "code": "teapot", "error": "x"})
    assert e.value.code == wire.BAD_REQUEST
    assert wire.check_reply(wire.ok_reply(cert="c")) == {"v": 1, "ok": True, "cert": "c"}


def test_a_reply_of_another_version_is_a_version_mismatch():
    with pytest.raises(wire.VersionMismatch, match="relay speaks link protocol None"):
        wire.check_reply({"ok": True, "cert": "c"})
