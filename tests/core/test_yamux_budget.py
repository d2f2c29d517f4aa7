"""Receive budgets of the yamux core, on both builds (fixture ``ymx``): the
window the streams of one session, and of all sessions sharing a node
budget, may grow above their initial 256 KiB. Plus a differential test that
drives whole sessions through growth, contention and shrinking on both
builds and compares them."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relayd import errors
from relayd.core import _yamux_py as K
from relayd.core.config import INITIAL_WINDOW, MuxConfig
from tests.conftest import BUILDS, yamux_build
from tests.core.frames import wnd

KiB = 1024
MiB = 1024 * KiB


class Link:
    """A client session sending to a server session of one build, with a
    clock; the server consumes what it receives when told to."""

    def __init__(self, mod, cfg, node=None, rtt=0.01):
        self.c = mod.Session(True, cfg)
        self.s = mod.Session(False, cfg, node)
        self.s.set_rtt(rtt)
        self.now = 0.0
        self.unread = {}

    def open(self):
        sid = self.c.open_stream(self.now)
        self.to_server()
        self.s.accept_stream(sid)
        self.to_client()
        return sid

    def to_server(self):
        for ev in self.s.receive_data(self.c.data_to_send()):
            if type(ev).__name__ == "DataReceived":
                self.unread[ev.stream_id] = self.unread.get(ev.stream_id, 0) + len(ev.data)

    def to_client(self):
        self.c.receive_data(self.s.data_to_send())

    def send(self, sid, n=None):
        """Send ``n`` bytes (all the window allows by default); returns bytes sent."""
        n = self.c.send_window(sid) if n is None else min(n, self.c.send_window(sid))
        sent = self.c.send_data(sid, bytes(n))
        self.to_server()
        return sent

    def consume(self, sid, dt):
        self.now += dt
        n = self.unread.pop(sid, 0)
        self.s.consume(sid, n, self.now)
        self.to_client()

    def in_flight_limit(self, sids):
        """What the client may still send plus what the server holds unread:
        the memory the link can cost, whatever either end does."""
        return sum(self.c.send_window(i) + self.unread.get(i, 0) for i in sids)


def test_one_fast_stream_takes_the_whole_budget(ymx):
    cfg = MuxConfig(max_window=4 * MiB, recv_budget=2 * MiB, node_recv_budget=2 * MiB)
    link = Link(ymx, cfg)
    sid = link.open()
    for _ in range(12):
        link.send(sid)
        link.consume(sid, 0.001)  # far faster than 4 RTT per window: window-bound
    assert link.s.recv_window(sid) == INITIAL_WINDOW + 2 * MiB
    assert link.s.recv_budget_used() == 2 * MiB
    assert link.in_flight_limit([sid]) <= INITIAL_WINDOW + 2 * MiB


def test_budget_at_least_max_window_changes_nothing(ymx):
    link = Link(ymx, MuxConfig(max_window=1 * MiB, recv_budget=16 * MiB))
    sid = link.open()
    targets = []
    for _ in range(8):
        link.send(sid)
        link.consume(sid, 0.001)
        targets.append(link.s.recv_window(sid))
    assert targets[:3] == [2 * INITIAL_WINDOW, 4 * INITIAL_WINDOW, 1 * MiB]
    assert link.s.recv_budget_used() == 1 * MiB - INITIAL_WINDOW


def test_many_fast_streams_split_the_budget(ymx):
    budget = 2 * MiB
    cfg = MuxConfig(max_window=16 * MiB, recv_budget=budget, node_recv_budget=budget)
    link = Link(ymx, cfg)
    first = link.open()
    for _ in range(8):
        link.send(first)
        link.consume(first, 0.001)
    assert link.s.recv_window(first) == INITIAL_WINDOW + budget  # alone, it takes it all
    sids = [first] + [link.open() for _ in range(7)]
    grew = set()
    for _ in range(20):
        for sid in sids:
            link.send(sid)
            link.consume(sid, 0.001)
            assert link.s.recv_budget_used() <= budget
            assert sum(link.s.recv_window(i) - INITIAL_WINDOW for i in sids) <= budget
            assert link.in_flight_limit(sids) <= 8 * INITIAL_WINDOW + budget
            if link.s.recv_window(sid) > INITIAL_WINDOW:
                grew.add(sid)
    # Nobody keeps the budget to itself: while others wait, a stream above
    # an equal share gives back, so every stream gets a share.
    assert grew == set(sids)
    assert link.s.recv_window(first) - INITIAL_WINDOW < budget // 2
    assert link.s.recv_budget_used() > budget // 2


def test_ends_return_the_charge(ymx):
    node = ymx.WindowBudget(64 * MiB)
    link = Link(ymx, MuxConfig(max_window=4 * MiB, recv_budget=8 * MiB), node)
    a, b, c = link.open(), link.open(), link.open()
    for _ in range(6):
        for sid in (a, b, c):
            link.send(sid)
            link.consume(sid, 0.001)
    per = [link.s.recv_window(i) - INITIAL_WINDOW for i in (a, b, c)]
    assert min(per) > 0 and link.s.recv_budget_used() == sum(per) == node.used
    link.c.send_eof(a)  # the peer's FIN: no more data on a, its window is free
    link.to_server()
    assert link.s.recv_budget_used() == per[1] + per[2] == node.used
    link.s.reset_stream(b)
    assert link.s.recv_budget_used() == per[2] == node.used
    link.c.reset_stream(c)
    link.to_server()
    assert link.s.recv_budget_used() == 0 == node.used


def test_slow_consumer_shrinks_and_frees_as_the_peer_uses_its_credit(ymx):
    link = Link(ymx, MuxConfig(max_window=4 * MiB, recv_budget=4 * MiB), rtt=0.01)
    sid = link.open()
    for _ in range(8):
        link.send(sid)
        link.consume(sid, 0.001)
    assert link.s.recv_window(sid) == 4 * MiB
    charged = link.s.recv_budget_used()
    for _ in range(20):  # now the reader takes 10 s per window: it, not the window, limits
        link.send(sid, 256 * KiB)
        link.consume(sid, 10.0)
        assert link.s.recv_budget_used() <= charged
        charged = link.s.recv_budget_used()
    assert link.s.recv_window(sid) == INITIAL_WINDOW
    assert link.s.recv_budget_used() == 0
    # and the peer was never left without credit
    assert link.send(sid, 1) == 1


def test_hiccups_shorter_than_window_idle_do_not_shrink(ymx):
    """The RTT comes from pings on a quiet moment; a slow epoch on a busy
    machine is not a slow stream unless it lasts longer than window_idle."""
    link = Link(ymx, MuxConfig(max_window=4 * MiB, recv_budget=4 * MiB, window_idle=1.0), rtt=0.0005)
    sid = link.open()
    for _ in range(8):
        link.send(sid)
        link.consume(sid, 0.0001)
    assert link.s.recv_window(sid) == 4 * MiB
    for _ in range(6):
        link.send(sid)
        link.consume(sid, 0.9)  # 900 ms for a window: far beyond 16 RTT, under window_idle
        assert link.s.recv_window(sid) == 4 * MiB
    link.send(sid)
    link.consume(sid, 2.5)
    assert link.s.recv_window(sid) == 2 * MiB


def test_idle_stream_keeps_only_the_credit_the_peer_holds(ymx):
    """yamux cannot take credit back: a stream that goes idle after a burst
    stays charged for what the peer may still send, no more."""
    link = Link(ymx, MuxConfig(max_window=4 * MiB, recv_budget=4 * MiB))
    sid = link.open()
    for _ in range(8):
        link.send(sid)
        link.consume(sid, 0.001)
    assert link.s.recv_budget_used() == link.c.send_window(sid) - INITIAL_WINDOW == 4 * MiB - INITIAL_WINDOW


def test_node_budget_is_shared_by_sessions(ymx):
    node = ymx.WindowBudget(1 * MiB)
    cfg = MuxConfig(max_window=16 * MiB, recv_budget=4 * MiB)
    links = [Link(ymx, cfg, node) for _ in range(3)]
    sids = [link.open() for link in links]
    for _ in range(10):
        for link, sid in zip(links, sids):
            link.send(sid)
            link.consume(sid, 0.001)
            assert node.used == sum(x.s.recv_budget_used() for x in links) <= node.limit
    assert node.used == node.limit and node.available() == 0
    links[0].s.release_windows()  # its transport is gone
    links[0].s.release_windows()
    assert node.used == links[1].s.recv_budget_used() + links[2].s.recv_budget_used()
    # a session that failed gives its share back too
    links[1].s.receive_data(b"\x07" * 12)
    assert links[1].s.failed and node.used == links[2].s.recv_budget_used()
    link = links[0]  # released: its windows grow no more
    before = link.s.recv_window(sids[0])
    link.send(sids[0])
    link.consume(sids[0], 0.001)
    assert link.s.recv_window(sids[0]) <= before and node.used == links[2].s.recv_budget_used()


def test_zero_budget_is_plain_yamux(ymx):
    link = Link(ymx, MuxConfig(recv_budget=0, node_recv_budget=0))
    sid = link.open()
    for _ in range(6):
        link.send(sid)
        link.consume(sid, 0.001)
        assert link.s.recv_window(sid) == INITIAL_WINDOW
    assert link.s.recv_budget_used() == 0


def test_window_budget_of_the_other_build_is_refused():
    if "compiled" not in BUILDS:
        pytest.skip("RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
    compiled, pure = yamux_build("compiled"), yamux_build("pure")
    with pytest.raises(TypeError):
        compiled.Session(False, None, pure.WindowBudget(1))


def test_window_budget(ymx):
    node = ymx.WindowBudget(100)
    assert (node.limit, node.used, node.available()) == (100, 0, 100)
    node.used = 130  # a link that was already charged when the limit shrank
    assert node.available() == 0
    with pytest.raises(ValueError):
        ymx.WindowBudget(-1)


def test_budget_config_is_validated():
    with pytest.raises(errors.ConfigError, match="recv_budget"):
        MuxConfig(recv_budget=-1)
    with pytest.raises(errors.ConfigError, match="node_recv_budget"):
        MuxConfig(recv_budget=32 * MiB, node_recv_budget=16 * MiB)
    with pytest.raises(errors.ConfigError, match="window_idle"):
        MuxConfig(window_idle=0)
    cfg = MuxConfig()
    assert cfg.recv_budget == 16 * MiB and cfg.node_recv_budget == 256 * MiB


def test_budget_keys_in_the_toml_config(tmp_path):
    from relayd.config import load_serve

    path = tmp_path / "relayd.toml"
    path.write_text("[mux]\nrecv_budget = 8388608\nnode_recv_budget = 134217728\nwindow_idle = 2\n")
    cfg = load_serve(path)
    assert cfg.mux.recv_budget == 8 * MiB and cfg.mux.node_recv_budget == 128 * MiB
    assert cfg.mux.window_idle == 2
    path.write_text("[mux]\nrecv_budget = '8M'\n")
    with pytest.raises(errors.ConfigError, match="mux.recv_budget"):
        load_serve(path)
    path.write_text("[mux]\nrecv_budget = 8388608\nnode_recv_budget = 1\n")
    with pytest.raises(errors.ConfigError, match="node_recv_budget"):
        load_serve(path)


# --- both builds, one truth ----------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.just("send"), st.integers(0, 7), st.sampled_from([None, 1, 70000, 300000])),
        st.tuples(st.just("consume"), st.integers(0, 7), st.sampled_from([0.0, 0.0005, 0.002, 0.05, 3.0])),
        # a window's worth sent and read at once: the way windows grow
        st.tuples(st.just("burst"), st.integers(0, 7), st.sampled_from([0.0005, 0.002, 0.05, 3.0])),
        st.tuples(st.just("burst"), st.integers(0, 7), st.just(0.001)),
        st.tuples(st.just("fin"), st.integers(0, 7)),
        st.tuples(st.just("reset"), st.integers(0, 7)),
        st.tuples(st.just("peer_reset"), st.integers(0, 7)),
        st.tuples(st.just("rtt"), st.sampled_from([0.0, 0.001, 0.01, 0.2])),
        st.tuples(st.just("release")),
    ),
    min_size=1,
    max_size=120,
)


def drive(build, cfg, node_limit, script):
    mod = yamux_build(build)
    node = mod.WindowBudget(node_limit)
    link = Link(mod, cfg, node)
    sids, out = [], []
    for op in script:
        kind = op[0]
        sid = sids[op[1] % len(sids)] if len(op) > 1 and sids and isinstance(op[1], int) else None
        try:
            if kind == "open":
                if len(sids) < 8:
                    sids.append(link.open())
                res = None
            elif sid is None and kind not in ("rtt", "release"):
                res = "no stream"
            elif kind == "send":
                res = link.send(sid, op[2])
            elif kind == "consume":
                link.consume(sid, op[2])
                res = None
            elif kind == "burst":
                res = link.send(sid)
                link.consume(sid, op[2])
            elif kind == "fin":
                link.c.send_eof(sid)
                link.to_server()
                res = None
            elif kind == "reset":
                link.s.reset_stream(sid)
                link.to_client()
                res = None
            elif kind == "peer_reset":
                link.c.reset_stream(sid)
                link.to_server()
                res = None
            elif kind == "rtt":
                res = link.s.set_rtt(op[1])
            else:
                res = link.s.release_windows()
        except Exception as exc:
            res = ("raise", type(exc).__name__, str(exc))
        out.append((kind, res, link.s.recv_budget_used(), node.used,
                    tuple(link.s.recv_window(i) for i in sids), tuple(link.c.send_window(i) for i in sids)))
        assert link.s.recv_budget_used() <= cfg.recv_budget
        assert node.used <= node.limit
    return out


@pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: only the pure twin is built")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    script=ops,
    budget=st.sampled_from([0, 300 * KiB, 1 * MiB, 4 * MiB]),
    node_limit=st.sampled_from([0, 512 * KiB, 64 * MiB]),
)
def test_budgets_compiled_and_pure_agree(script, budget, node_limit):
    cfg = MuxConfig(max_window=2 * MiB, recv_budget=budget, node_recv_budget=max(budget, 1))
    assert drive("compiled", cfg, node_limit, script) == drive("pure", cfg, node_limit, script)


@pytest.mark.parametrize("build", BUILDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=ops)
def test_budgets_hold_whatever_happens(build, script):
    """drive() asserts after every step that neither budget is exceeded."""
    drive(build, MuxConfig(max_window=2 * MiB, recv_budget=1 * MiB), 768 * KiB, script)
