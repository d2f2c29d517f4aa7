"""The TCP splice's limits come from its config (relayd.core.config.SpliceConfig):
a client waiting for its stream is held up to ``max_held``, then reading
pauses; one that keeps sending past ``max_pending`` anyway is aborted."""

from relayd.core.config import SpliceConfig
from relayd.net.splice import TcpSplice


class Transport:
    def __init__(self):
        self.paused = False
        self.aborted = False

    def get_extra_info(self, key, default=None):
        return default

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def abort(self):
        self.aborted = True


def test_a_held_client_pauses_at_max_held_and_is_aborted_past_max_pending():
    t = Transport()
    sp = TcpSplice(limits=SpliceConfig(max_pending=64 * 1024, max_held=2048))
    sp.connection_made(t)
    sp.data_received(b"x" * 2048)
    assert not t.paused
    sp.data_received(b"x")
    assert t.paused and not t.aborted
    sp.data_received(b"x" * (61 * 1024))  # in flight before the pause took effect: still held
    assert not t.aborted
    sp.data_received(b"x" * 1024)
    assert t.aborted


def test_the_defaults_hold_more():
    t = Transport()
    sp = TcpSplice()
    sp.connection_made(t)
    sp.data_received(b"x" * 4096)
    assert not t.paused
