"""Hostile clients of the hybrid connections on the relay's HTTPS port (a
real relay process): forged and malformed tokens, a request on $hc that is
no upgrade, a listener that breaks the WebSocket protocol, oversized and
malformed control messages, a guessed rendezvous, a sender that talks before
its answer, hostile HTTP-mode requests. Each is refused or closed alone,
counted, with no attack payload in the relay's log, while the bystander's
TCP stream and kept-alive HTTPS connection through the agent go on."""

import base64
import os
import socket
import ssl
import time

from relayd.control import sas
from tests.adversarial.stack import ATTACKER, MARKER, read_all, statuses
from tests.waiting import until_sync

KEY_NAME, KEY = "root", "aHlicmlkLWFidXNlLWtleS0xMjM0NTY="
STACK_CONFIG = f'''  # the relay's hybrid connections (the stack fixture reads it)
[[hybrid.rules]]
name = "{KEY_NAME}"
key = "{KEY}"
rights = ["listen", "send"]
[[hybrid.connections]]
path = "hc1"
'''


def token(path="hc1", ttl=600) -> str:
    return sas.make_token(f"http://app.example/{path}", KEY_NAME, KEY, int(time.time()) + ttl)


def upgrade(path_query: str, extra: str = "") -> bytes:
    return (f"GET /$hc/{path_query} HTTP/1.1\r\nHost: app.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n").encode()


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (the payload as it is)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def listener(stack):
    """A listener's control channel, from the attacker's address."""
    s = stack.tls(ATTACKER)
    s.sendall(upgrade("hc1?sb-hc-action=listen", f"ServiceBusAuthorization: {token()}\r\n"))
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 "), head[:200]
    return s


def hybrid_bad_input(stack) -> float:
    return stack.metric("relayd_bad_input_total", where="hybrid")


def test_forged_and_malformed_tokens_and_a_plain_request_on_hc(stack, unharmed):
    good = token()
    for tok, status in ((good.replace("sig=", "sig=A"), 401), ("SharedAccessSignature " + MARKER.decode(), 401),
                        (MARKER.decode() * 100, 401), (token("other"), 403), ("", 401)):
        raw = stack.https(upgrade("hc1?sb-hc-action=listen", f"ServiceBusAuthorization: {tok}\r\n" if tok else ""))
        assert statuses(raw) == [status], raw[:200]
        assert MARKER not in raw.split(b"\r\n\r\n")[0]  # the reason never quotes the token
    raw = stack.https(b"GET /$hc/hc1?sb-hc-action=listen HTTP/1.1\r\nHost: app.example\r\n\r\n" + MARKER)
    assert statuses(raw) == [400]
    raw = stack.https(upgrade("hc1?sb-hc-action=" + MARKER.decode()))
    assert statuses(raw) == [400]
    raw = stack.https(upgrade("hc1?sb-hc-action=accept&sb-hc-rendezvous=" + MARKER.decode()))
    assert statuses(raw) == [403]
    assert stack.metric("relayd_hc_refusals_total") >= 8


def test_a_listener_that_breaks_the_protocol_is_closed_alone(stack, unharmed):
    before = hybrid_bad_input(stack)
    s = listener(stack)
    s.sendall(frame(0x3, MARKER))  # a reserved opcode
    got = read_all(s)
    assert got[:1] == b"\x88" and got[2:4] == (1002).to_bytes(2, "big")
    s.close()
    until_sync(lambda: hybrid_bad_input(stack) > before, 10, "the protocol error was not counted")


def test_oversized_and_malformed_control_messages_are_counted_and_ignored(stack, unharmed):
    s = listener(stack)
    before = hybrid_bad_input(stack)
    big = b'{"renewToken": {"token": "' + MARKER * 10000 + b'"}}'  # over 64 KiB
    s.sendall(frame(0x1, big[:40000], fin=False) + frame(0x0, big[40000:]))
    s.sendall(frame(0x1, b"{" + MARKER))  # not JSON
    s.sendall(frame(0x1, b'{"response": {"requestId": "' + MARKER + b'", "statusCode": 200}}'))  # nobody's
    s.sendall(frame(0x2, MARKER))  # a stray binary message
    until_sync(lambda: hybrid_bad_input(stack) >= before + 2, 10, "the bad control messages were not counted")
    s.sendall(frame(0x9, b"still there?"))  # the channel lives: a ping gets its pong
    got = b""
    while b"still there?" not in got:
        got += s.recv(4096)
    s.close()


def test_a_sender_that_talks_before_its_answer_is_cut(stack, unharmed):
    lst = listener(stack)
    try:
        s = stack.tls(ATTACKER)
        try:
            s.sendall(upgrade("hc1?sb-hc-action=connect", f"ServiceBusAuthorization: {token()}\r\n") + MARKER * 10000)
        except (ssl.SSLError, ConnectionError):
            got = b""  # cut while it was still talking (a loaded machine gets there first)
        else:
            got = read_all(s)
        assert not got.startswith(b"HTTP/1.1 101"), got[:100]
        s.close()
    finally:
        lst.close()  # else the next test's request would go to this listener


def test_hostile_http_mode_requests(stack, unharmed):
    # A bad token with a body, and a good one with no listener connected.
    body = MARKER * 1000
    for extra, path, status in (("ServiceBusAuthorization: SharedAccessSignature x\r\n", "hc1", 401),
                                ("", "hc1", 401),
                                (f"ServiceBusAuthorization: {token()}\r\n", "hc1/x", 502)):
        raw = stack.https(f"POST /{path} HTTP/1.1\r\nHost: app.example\r\n{extra}Content-Length: {len(body)}\r\n"
                          f"Connection: close\r\n\r\n".encode() + body)
        assert statuses(raw) == [status], (path, raw[:200])
        assert MARKER not in raw
    # Garbage instead of an HTTP head on the same host: 400, nothing else.
    raw = stack.https(b"\x16\x03\x01" + MARKER + b"\r\n\r\n")
    assert statuses(raw) == [400]
    with socket.create_connection(("127.0.0.1", stack.ports["https"]), 5) as s:
        s.sendall(MARKER + b"\r\n\r\n")  # not even TLS: the handshake fails, the connection ends
        assert b"HTTP" not in read_all(s)
