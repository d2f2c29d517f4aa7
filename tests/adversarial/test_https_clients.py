"""Hostile HTTPS clients against a real relay and agent: requests that the
relay refuses after opening a stream (the agent's link must survive them,
every time), request smuggling, upgrade tricks, paths that try to leave
their route, HTTP/0.9 and bare LF, slowloris. A bystander's TCP stream and
kept-alive HTTPS connection run through all of it and must stay intact."""

import socket

import pytest

from tests.adversarial.stack import MARKER, HttpService, cut, statuses
from tests.waiting import until_sync


REQ = b"GET /x HTTP/1.1\r\nHost: app.example\r\n\r\n"
LINK_KILLERS = {
    # the relay opens a stream, sends the head, then refuses: SYN + data + RST
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + MARKER,
    "valid_then_garbage": REQ + b"\x00\x01\x02 garbage " + MARKER + b"\r\n\r\n",
    "too_many_pipelined": REQ * 40,
    "chunked_then_bad_trailer": b"POST / HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"3\r\nabc\r\n0\r\n\x00bad\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(LINK_KILLERS))
def test_refused_requests_never_cut_the_agents_link(stack, unharmed, name):
    """Defect: SYN, data and RST in one write made the agent raise in its
    event loop and drop the link with every stream; repeated, it kept the
    agent's services down. Now 30 rounds leave the link as it was."""
    for _ in range(30):
        got = stack.https(LINK_KILLERS[name])
        assert 400 in statuses(got) or cut(got), got[:200]
    # The agent answers normally afterwards, on the same link.
    assert b"ok /after" in stack.https(b"GET /after HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("connection", [b"content-length", b"Content-Length, close", b"transfer-encoding, host"])
def test_connection_cannot_strip_content_length(stack, unharmed, connection):
    """Defect: `Connection: content-length` removed Content-Length while the
    body still went on: the service read the body as a second request, with
    the attacker's Host and X-Forwarded-For."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-For: 10.9.9.9\r\nX-Marker: " + MARKER + \
        b"\r\n\r\n"
    HttpService.requests.clear()
    got = stack.https(b"POST /form HTTP/1.1\r\nHost: app.example\r\nConnection: " + connection +
                      b"\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled +
                      b"GET /last HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
    assert statuses(got)[:1] == [200]
    urls = [r["url"] for r in HttpService.requests if not r["url"].startswith(b"/bystander")]
    assert b"/admin" not in urls
    form = [r for r in HttpService.requests if r["url"] == b"/form"][0]
    assert form["body"] == smuggled and form["headers"][b"x-forwarded-for"] == b"127.0.0.2"
    assert form["headers"][b"forwarded"].startswith(b"for=127.0.0.2")


def test_bytes_after_a_refused_upgrade_never_reach_the_service(stack, unharmed):
    """Defect: bytes after an Upgrade request went raw to the service before
    it answered; it answered 200 and parsed them as a request."""
    HttpService.requests.clear()
    got = stack.https(b"GET /evil/refuse-upgrade HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n"
                      b"GET /smuggled HTTP/1.1\r\nHost: app.example\r\nX-Marker: " + MARKER + b"\r\n\r\n")
    assert statuses(got) == [200] and b"no" in got
    assert not [r for r in HttpService.requests if r["url"] == b"/smuggled"]


def test_connect_is_refused(stack, unharmed):
    got = stack.https(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: app.example\r\n\r\nSSH-2.0-" + MARKER + b"\r\n")
    assert statuses(got) == [405]


@pytest.mark.parametrize("target,status,seen", [
    (b"/api/../x", 200, b"/x"),
    (b"/%2e%2e/etc/passwd", 400, None),
    (b"/a/..%2F..%2Fb", 400, None),
    (b"/a/..;/b", 400, None),
    (b"http://other.example/x", 400, None),
    (b"http://app.example/abs?q=1", 200, b"/abs?q=1"),
])
def test_paths_are_normalised_or_refused(stack, unharmed, target, status, seen):
    HttpService.requests.clear()
    got = stack.https(b"GET " + target + b" HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
    assert statuses(got) == [status], got[:200]
    if seen is not None:
        assert [r["url"] for r in HttpService.requests if not r["url"].startswith(b"/bystander")] == [seen]


@pytest.mark.parametrize("first", [b"GET /\r\n", b"GET / HTTP/1.1\nHost: app.example\n\n", b"\x16\x03garbage\r\n"])
def test_http09_and_bare_lf_are_answered_at_once(stack, unharmed, first):
    """Defect: held until the 10 s head timeout instead of a 400."""
    got = stack.https(first, timeout=5)  # the deadline: half the head timeout
    assert statuses(got) == [400], got[:200]


def test_slowloris_is_cut_and_counted(stack, unharmed):
    before = stack.metric("relayd_bad_input_total", where="https", kind="head_timeout")
    s = stack.tls()
    s.sendall(b"GET / HTTP/1.1\r\nHost: app.example\r\n")
    s.settimeout(12)  # the deadline: the head timeout (10 s) cuts it first
    try:
        while s.recv(100):
            pass
    except socket.timeout:
        raise AssertionError("a head that never ends was not cut at the head timeout") from None
    except OSError:
        pass
    assert stack.metric("relayd_bad_input_total", where="https", kind="head_timeout") == before + 1
    s.close()


def test_header_flood_and_huge_head(stack, unharmed):
    flood = b"GET / HTTP/1.1\r\nHost: app.example\r\n" + b"".join(b"X-%d: %s\r\n" % (i, MARKER) for i in range(200))
    assert statuses(stack.https(flood + b"\r\n")) == [431]
    huge = b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Big: " + b"a" * 100_000
    assert statuses(stack.https(huge)) == [431]


def test_unknown_host_is_a_404_and_the_log_has_no_path(stack, unharmed):
    got = stack.https(b"GET /capability-" + MARKER + b" HTTP/1.1\r\nHost: nobody.example\r\n\r\n")
    assert statuses(got) == [404]


def test_garbage_on_the_agents_port_is_counted(stack, unharmed):
    before = stack.metric("relayd_bad_input_total", where="agent_port", kind="not_tls")
    s = socket.create_connection(("127.0.0.1", stack.ports["agents"]), 5, source_address=("127.0.0.2", 0))
    s.sendall(b"GET / HTTP/1.1\r\n\r\n" + MARKER)
    try:
        s.recv(100)
    except OSError:
        pass
    s.close()
    until_sync(lambda: stack.metric("relayd_bad_input_total", where="agent_port", kind="not_tls") == before + 1,
               5, "garbage on the agents port was not counted", ignore=(OSError,))
