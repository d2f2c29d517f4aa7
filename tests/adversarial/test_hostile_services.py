"""Hostile or broken services behind the agent: forged responses after a
chunked body, a 101 riding behind one, malformed chunks, a response cut
short. The relay's side of the link must survive, forged bytes must never
reach the client, and a cut response must never look complete."""

from tests.adversarial.stack import MARKER, cut, statuses


def get(stack, path: bytes) -> bytes:
    return stack.https(b"GET " + path + b" HTTP/1.1\r\nHost: app.example\r\n\r\n"
                       b"GET /next HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")

def test_chunked_response_then_101_does_not_tear_down_the_relay(stack, unharmed):
    """Defect: httptools raised HttpParserUpgrade (not an HttpParserError)
    out of the ingress into uvloop, and the relay dropped the agent."""
    for _ in range(10):
        got = get(stack, b"/evil/chunked-then-101")
        assert got.count(b"HTTP/1.1 ") == 1 and b"101" not in got and MARKER not in got
        assert got.split(b"\r\n\r\n", 1)[1] == b"5\r\nhello\r\n0\r\n\r\n"

def test_forged_response_after_a_chunked_body_never_reaches_the_client(stack, unharmed):
    before = stack.metric("relayd_bad_input_total", where="http_service", kind="past_chunked_end")
    got = get(stack, b"/evil/chunked-then-forged")
    assert statuses(got) == [200] and MARKER not in got
    assert stack.metric("relayd_bad_input_total", where="http_service", kind="past_chunked_end") == before + 1

def test_malformed_chunk_resets_the_client(stack, unharmed):
    before = stack.metric("relayd_bad_input_total", where="http_service", kind="bad_chunked_response")
    got = stack.https(b"GET /evil/bad-chunk HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert cut(got) and b"zz" not in got
    assert stack.metric("relayd_bad_input_total", where="http_service", kind="bad_chunked_response") == before + 1

def test_response_cut_short_is_a_reset_not_an_end(stack, unharmed):
    got = stack.https(b"GET /evil/cut HTTP/1.1\r\nHost: app.example\r\n\r\n")
    assert statuses(got) == [200]
    assert cut(got), got[-80:]
