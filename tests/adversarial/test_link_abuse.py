"""Abuse of the link protocol by a client holding a valid agent certificate
(a stolen or rogue agent): a SYN and a protocol error in one write, SYN
floods, unknown preamble requests. The relay ends that link with GoAway and
a counted metric, never by an exception in its event loop, and everybody
else's traffic goes on."""

import socket
import ssl

import pytest

from relayd.agent import AgentNode
from relayd.config import AgentConfig
from relayd.core import _yamux_py as K
from relayd.core import wire
from relayd.core.framing import MessageReader, encode_message
from relayd.net import run
from tests.adversarial.stack import MARKER, cli
from tests.core.frames import data, frame, parse_frames, syn, wnd
from tests.waiting import until_sync


@pytest.fixture(scope="module")
def rogue(stack, tmp_path_factory):
    """An enrolled agent identity the test drives by hand."""
    token = cli("admin", "join-token", "--data", str(stack.data)).stdout.strip()
    d = tmp_path_factory.mktemp("rogue")
    node = AgentNode(AgentConfig(data=d, join=token, endpoints={"x": ("127.0.0.1", 9)}))
    run(node.enroll(token))
    ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
    ctx.load_cert_chain(str(d / "agent.crt"), str(d / "agent.key"))
    return ctx


def open_link(stack, ctx, request=None) -> tuple[ssl.SSLSocket, dict]:
    raw = socket.create_connection(("127.0.0.1", stack.ports["agents"]), 10, source_address=("127.0.0.3", 0))
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False)
    s.sendall(encode_message(request or wire.encode_request(wire.TunnelRequest(()))))
    reader = MessageReader()
    while True:
        msg, rest = reader.feed(s.recv(65536))
        if msg is not None:
            return s, msg


def frames_until_close(s) -> list:
    buf = b""
    s.settimeout(10)
    try:
        while chunk := s.recv(65536):
            buf += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    out, pos = [], 0
    while pos + 12 <= len(buf):  # whole frames only
        f = parse_frames(buf[pos:pos + 12])[0] if buf[pos + 1] != K.TYPE_DATA else None
        if f is None:
            ln = int.from_bytes(buf[pos + 8:pos + 12], "big")
            pos += 12 + ln
            continue
        out.append(f)
        pos += 12
    return out


@pytest.mark.parametrize("case,kind", [
    ("window", "FlowControlError"),
    ("reused_id", "StreamIdError"),
    ("unexpected_ack", "InvalidFlags"),
    ("syn_flood", "FloodError"),
    ("garbage", "BadVersion"),
])
def test_protocol_error_after_a_syn_ends_only_that_link(stack, unharmed, rogue, case, kind):
    bad = {
        "window": syn(1) + frame(K.TYPE_DATA, 0, 1, K.INITIAL_WINDOW + 1, MARKER),
        "reused_id": syn(1) + data(1, MARKER) + syn(1),
        "unexpected_ack": syn(1) + wnd(1, 0, K.FLAG_ACK),
        "syn_flood": b"".join(syn(i) for i in range(1, 1 + 2 * 5000, 2)),
        "garbage": syn(1) + b"\x07" * 24 + MARKER,
    }[case]
    before = stack.metric("relayd_protocol_errors_total", kind=kind)
    s, reply = open_link(stack, rogue)
    assert reply["ok"]
    s.sendall(bad)
    frames = frames_until_close(s)
    goaways = [f for f in frames if f[0] == K.TYPE_GO_AWAY]
    assert goaways and goaways[-1][3] == K.GO_AWAY_PROTOCOL_ERROR, frames[-5:]
    s.close()
    until_sync(lambda: stack.metric("relayd_protocol_errors_total", kind=kind) == before + 1, 5,
               f"{kind} was not counted", ignore=(OSError,))


def test_unknown_request_is_refused_counted_and_not_echoed(stack, unharmed, rogue):
    before = stack.metric("relayd_bad_input_total", where="agent_port", kind="unknown_op")
    s, reply = open_link(stack, rogue, {"v": wire.LINK_VERSION, "op": "shell " + MARKER.decode(), "cmd": "id"})
    assert reply == {"v": wire.LINK_VERSION, "ok": False, "code": "bad_request", "error": "an unknown request"}
    s.close()
    assert stack.metric("relayd_bad_input_total", where="agent_port", kind="unknown_op") == before + 1


def test_another_link_version_gets_a_reply_naming_both_versions(stack, unharmed, rogue):
    s, reply = open_link(stack, rogue, {"v": 7, "op": "tunnel", "endpoints": []})
    s.close()
    assert reply["ok"] is False and reply["code"] == "version" and reply["v"] == wire.LINK_VERSION
    assert "speaks link protocol 7" in reply["error"] and f"speaks {wire.LINK_VERSION}" in reply["error"]
    with pytest.raises(wire.VersionMismatch, match="7"):
        wire.check_reply({**reply, "v": 7})  # as an agent of version 7 reads it


def test_rogue_agent_streams_toward_the_relay_are_refused(stack, unharmed, rogue):
    """Agents may not open streams to the relay: each is reset, the link lives."""
    s, reply = open_link(stack, rogue)
    s.sendall(b"".join(syn(i) + data(i, MARKER) for i in range(1, 201, 2)))
    s.settimeout(5)
    buf = b""
    while buf.count(b"\x00\x01\x00\x08") < 100:  # WindowUpdate with RST, one per stream
        chunk = s.recv(65536)
        assert chunk, "the relay closed the link"
        buf += chunk
    s.close()


def test_the_link_survives_a_client_that_disappears_mid_frame(stack, unharmed, rogue):
    s, reply = open_link(stack, rogue)
    s.sendall(syn(1) + frame(K.TYPE_DATA, 0, 1, 1000, b"half"))
    s.close()
    until_sync(lambda: stack.metric("relayd_active_listeners") == 1, 10,
               "the relay kept the link of a client that went away", ignore=(OSError,))
