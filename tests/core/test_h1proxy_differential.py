"""Both builds, one truth, for the ingress's HTTP/1.1 framing machine
(relayd/core/_h1proxy_py.py and its compiled twin), driven directly, without
the adapter: the same random request streams from a client and response
streams from a service (valid messages, mutated ones, garbage), each cut at
random points and interleaved with the adapter's calls (a stream attached,
the service closing or resetting, the client's held bytes taken), must give
the same events and the same state after every step.

Checked against an injected bug: with ``if cython.compiled and
len(piece) == 5: piece = piece[:4]`` at the top of ``Framing._body``, built in
a separate worktree, test_framing_builds_agree failed on its first examples
("builds disagree at step ..."), and passed again without it.
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import harness
from relayd._build import extensions_disabled
from tests.core.splits import mutated, split_at

pytestmark = pytest.mark.skipif(extensions_disabled(), reason="RELAYD_NO_EXTENSIONS=1: no compiled build to compare")

REQUESTS = harness.REQUESTS + (
    b"GET /a HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /p HTTP/1.1\r\nHost: app.example\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /c HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n",
    b"GET /../x HTTP/1.1\r\nHost: app.example\r\nConnection: close, x-a\r\nX-A: 1\r\n\r\n",
)
RESPONSES = harness.RESPONSES + (
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\nclose-delimited",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nraw",
)


def render(value):
    """An event's value as plain data (a Request by its fields)."""
    if hasattr(value, "upstream_head"):
        return ("request", value.method, value.url, value.version, value.host, value.path, value.upstream_head,
                value.chunked, value.upgrade, value.head_only, value.keep_alive, value.expect_continue,
                value.last_upstream, value.complete, value.has_body, value.retried, value.body_bytes,
                tuple(value.headers))
    return value


def state(fr):
    return ("state", fr.client_state, fr.service_state, fr.closed, fr.raw, fr.resp_started, fr.body_left,
            fr.resp_left, fr.queued_bytes, len(fr.queue), fr.active is not None)


def drive(mod, client_reads, service_reads, actions):
    """Alternate the client's and the service's reads; after each, the
    adapter's part as ``actions`` says. Returns the transcript."""
    mod.clear_head_cache()
    fr = mod.Framing(b"127.0.0.1")
    log = []
    attached = False

    def run(events):
        nonlocal attached
        for code, value in events:
            log.append((code, render(value)))
            if code == 1 or code == 11:  # EV_START, EV_RETRY: a stream is there at once
                log.append(("sent", fr.request_bytes(code == 11 or not attached)))
                attached = True
            elif code == 6:  # EV_DROP
                attached = False
        log.append(state(fr))

    cs, ss = list(client_reads), list(service_reads)
    for i, act in enumerate(actions):
        if i % 2 == 0 and cs:
            run(fr.receive_client(cs.pop(0)))
        elif ss:
            run(fr.receive_service(ss.pop(0)))
        if act == 1:
            run(fr.service_closed(False))
        elif act == 2:
            run(fr.service_closed(True))
        elif act == 3:
            log.append(("held", fr.take_held()))
    for data in cs:
        run(fr.receive_client(data))
    for data in ss:
        run(fr.receive_service(data))
    return log


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(REQUESTS, 5) | st.binary(max_size=200), mutated(RESPONSES, 5) | st.binary(max_size=200),
       st.lists(st.integers(1, 400), max_size=6), st.lists(st.integers(1, 400), max_size=6),
       st.lists(st.sampled_from([0, 0, 0, 0, 1, 2, 3]), min_size=1, max_size=24))
def test_framing_builds_agree(requests, responses, ccuts, scuts, actions):
    client_reads = split_at(requests, sorted({c % (len(requests) + 1) for c in ccuts}))
    service_reads = split_at(responses, sorted({c % (len(responses) + 1) for c in scuts}))
    (la, a), (lb, b) = [(label, drive(mod, client_reads, service_reads, actions))
                        for label, mod in harness.builds("h1proxy")]
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"builds disagree at step {i}:\n  {la}: {x!r}\n  {lb}: {y!r}"
    assert len(a) == len(b)


def test_both_builds_name_every_state_alike():
    """The compiled build's C enums and the pure twin's ints give the same
    names through the same tables."""
    from relayd.core import _h1proxy_py

    for _, mod in harness.builds("h1proxy"):
        fr = mod.Framing(b"127.0.0.1")
        assert (fr.client_state, fr.service_state) == ("head", "idle")
        fr.receive_client(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
        assert (fr.client_state, fr.service_state) == ("length", "head")
        fr.request_bytes(True)
        fr.receive_service(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert (fr.client_state, fr.service_state) == ("length", "chunked")
        fr.close()
        assert (fr.client_state, fr.service_state) == ("closed", "closed")
    assert _h1proxy_py.CLIENT_STATES[_h1proxy_py.C_UPGRADE] == "upgrade"
    assert _h1proxy_py.SERVICE_STATES[_h1proxy_py.S_RAW] == "raw"
