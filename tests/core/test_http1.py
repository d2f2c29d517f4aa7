"""The one HTTP/1 head parser: strict RFC 9112 grammar, one set of limits."""

import pytest

from relayd.core import http1
from relayd.errors import ConfigError


def test_request_head_parts_and_lookup():
    h = http1.parse_request_head(b"\r\nGET /a/b?x=1 HTTP/1.1\r\nHost: relay.example\r\n"
                                 b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
                                 b"X-A: 1\r\nx-a:  2 \r\n\r\n")
    assert (h.method, h.target, h.version, h.path) == (b"GET", b"/a/b?x=1", b"1.1", b"/a/b")
    assert h.get(b"HOST") == b"relay.example"
    assert h.get(b"x-a") == b"1, 2"  # several fields joined, OWS trimmed
    assert h.tokens(b"connection") == {b"keep-alive", b"upgrade"}
    assert h.get(b"missing") is None and h.tokens(b"missing") == set()
    assert h.headers[0] == (b"Host", b"relay.example")  # names keep their case


def test_response_head():
    h = http1.parse_response_head(b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\n")
    assert (h.version, h.status, h.reason) == (b"1.0", 200, b"Connection established")
    assert http1.parse_response_head(b"HTTP/1.1 101\r\n\r\n").reason == b""


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",  # obs-fold
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",  # space before the colon
    b"GET / HTTP/1.1\r\nHo\x00st: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",  # a bare CR
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",  # a bare LF
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET /\r\n\r\n",  # HTTP/0.9
    b"G(T / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",  # no empty line
])
def test_malformed_request_heads_are_400(head):
    with pytest.raises(http1.HeadError) as e:
        http1.parse_request_head(head)
    assert e.value.status == 400


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 99 Low\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 O\x00K\r\n\r\n",
    b"HTTP/1.2 200 OK\r\n\r\n",
])
def test_malformed_response_heads(head):
    with pytest.raises(http1.HeadError):
        http1.parse_response_head(head)
    assert http1.RESPONSE_HEAD.match(head) is None  # the ingress's fast check agrees


def test_limits_are_431_and_one_set():
    limits = http1.HttpLimits(max_head=1024, max_headers=8)
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\n"
    with pytest.raises(http1.HeadError) as e:
        http1.parse_request_head(many, limits)
    assert e.value.status == 431
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * 1100 + b"\r\n\r\n"
    with pytest.raises(http1.HeadError) as e:
        http1.parse_request_head(big, limits)
    assert e.value.status == 431
    # Found too large before it is whole: refused without waiting for the end.
    with pytest.raises(http1.HeadError) as e:
        http1.find_request_head(big[:1050], limits.max_head)
    assert e.value.status == 431
    with pytest.raises(ConfigError, match="max_head"):
        http1.HttpLimits(max_head=10)
    with pytest.raises(ConfigError, match=r"http\.idle_timeout: must be between 0 and 3600 seconds \(got 0\)"):
        http1.HttpLimits(idle_timeout=0)


def test_find_request_head_refuses_garbage_at_once_and_waits_for_the_rest():
    assert http1.find_request_head(b"GET / HT") == -1
    assert http1.find_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n") == -1
    assert http1.find_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY") == 27
    for bad in (b"\x16\x03\x01\x02\x00\x01\n", b"GET /\r\n", b"SSH-2.0-OpenSSH\r\n"):
        with pytest.raises(http1.HeadError):
            http1.find_request_head(bad)
    # A whole head is found; its parser refuses what is wrong in it.
    assert http1.find_request_head(b"GET /\r\n\r\n") == 9
    with pytest.raises(http1.HeadError):
        http1.parse_request_head(b"GET /\r\n\r\n")


def test_response_writer():
    r = http1.response(404, b"nope\n")
    assert http1.parse_response_head(r[:r.index(b"\r\n\r\n") + 4]).get(b"content-length") == b"5"
    assert r.endswith(b"\r\n\r\nnope\n") and b"Connection: close" in r


def test_control_characters_in_values_and_reasons_are_refused():
    for head in (b"GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n"):
        with pytest.raises(http1.HeadError):
            http1.parse_request_head(head)
    assert http1.parse_request_head(b"GET / HTTP/1.1\r\nA: b\tc\xff\r\n\r\n").get(b"a") == b"b\tc\xff"
    bad = b"HTTP/1.1 200 O\x01K\r\n\r\n"
    with pytest.raises(http1.HeadError):
        http1.parse_response_head(bad)
    assert http1.RESPONSE_HEAD.match(bad) is None


def test_empty_lines_before_a_request_are_not_a_head():
    # Found by fuzz/fuzz_http1.py: "\r\n\r\n" read alone was taken for a whole
    # (empty) head, so the answer depended on how the reads were cut.
    assert http1.head_end(b"\r\n\r\n") == -1
    assert http1.find_request_head(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n") == 22
    with pytest.raises(http1.HeadError):
        http1.find_request_head(b"\r\n\r\nGET /a/ relay.example\r\n")
