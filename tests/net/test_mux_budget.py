"""Receive budgets through MuxConnection over loopback on uvloop: eight busy
streams together never get more window than the link's budget, one stream
alone gets all of it, and everything is given back when streams and links
end."""

import asyncio

from relayd.core import yamux
from relayd.core.config import INITIAL_WINDOW, MuxConfig
from relayd.net import mux, run

MiB = 1024 * 1024
BUDGET = 2 * MiB
CFG = MuxConfig(max_window=4 * MiB, recv_budget=BUDGET, node_recv_budget=BUDGET)


class Watched(mux.MuxConnection):
    """The receiving end: after every read from the transport, records the
    window its streams hold above their initial 256 KiB, and what its peer
    may still send on all of them."""

    peer = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_extra = 0
        self.max_stream = 0
        self.max_in_flight = 0
        self.samples = 0

    def data_received(self, data):
        super().data_received(data)
        s = self.session
        sids = s.stream_ids()
        extra = sum(s.recv_window(i) - INITIAL_WINDOW for i in sids)
        assert extra <= s.recv_budget_used() <= BUDGET
        self.max_extra = max(self.max_extra, extra)
        self.max_stream = max([self.max_stream] + [s.recv_window(i) for i in sids])
        if self.peer is not None:
            in_flight = sum(self.peer.session.send_window(i) for i in self.peer.session.stream_ids())
            self.max_in_flight = max(self.max_in_flight, in_flight)
        self.samples += 1


async def _link(node, **kw):
    loop = asyncio.get_running_loop()
    got = loop.create_future()

    def factory():
        conn = Watched(False, CFG, keepalive=False, budget=node)
        # Any consumption counts as window-bound: growth is decided by the
        # budgets alone, not by this machine's timing.
        conn.session.set_rtt(1000.0)
        loop.call_soon(got.set_result, conn)
        return conn

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: mux.MuxConnection(True, CFG, keepalive=False, **kw), "127.0.0.1", port)
    receiver = await asyncio.wait_for(got, 5)
    receiver.peer = client
    return server, client, receiver


async def _send(conn, nbytes):
    st = await conn.open_stream()
    chunk = bytes(256 * 1024)
    for _ in range(nbytes // len(chunk)):
        await st.write(chunk)
    st.write_eof()
    return st


async def _drain(st):
    n = 0
    while True:
        d = await st.read(1 << 20)
        if not d:
            break
        n += len(d)
    st.write_eof()
    return n


async def _transfer(client, receiver, streams, nbytes):
    senders = [asyncio.ensure_future(_send(client, nbytes)) for _ in range(streams)]
    incoming = [await asyncio.wait_for(receiver.accept_stream(), 10) for _ in range(streams)]
    got = await asyncio.wait_for(asyncio.gather(*(_drain(st) for st in incoming)), 120)
    await asyncio.wait_for(asyncio.gather(*senders), 10)
    assert got == [nbytes] * streams
    await asyncio.wait_for(receiver.drained(10), 15)


def test_one_stream_gets_the_whole_budget_and_eight_share_it():
    async def main():
        node = yamux.WindowBudget(BUDGET)
        server, client, receiver = await _link(node)

        await _transfer(client, receiver, 1, 24 * MiB)
        assert receiver.max_stream == INITIAL_WINDOW + BUDGET  # all of it, alone
        assert receiver.session.recv_budget_used() == 0 == node.used  # given back at the end

        receiver.max_extra = receiver.max_in_flight = 0
        await _transfer(client, receiver, 8, 6 * MiB)
        assert receiver.samples > 100
        assert BUDGET // 2 < receiver.max_extra <= BUDGET
        # what the sender may have in flight, i.e. what either end buffers
        assert receiver.max_in_flight <= 8 * INITIAL_WINDOW + BUDGET
        assert receiver.session.recv_budget_used() == 0 == node.used

        await client.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_a_lost_link_gives_its_share_of_the_node_back():
    async def main():
        node = yamux.WindowBudget(BUDGET)
        server, client, receiver = await _link(node)
        st = await client.open_stream()
        writer = asyncio.ensure_future(st.write(bytes(64 * MiB)))
        peer = await asyncio.wait_for(receiver.accept_stream(), 5)
        while receiver.session.recv_budget_used() < BUDGET:
            await peer.read(1 << 20)
        assert node.used == BUDGET
        client.abort()  # streams still open
        await asyncio.wait_for(receiver.closed_future, 5)
        assert node.used == 0
        await asyncio.gather(writer, return_exceptions=True)
        server.close()
        await server.wait_closed()

    run(main())


def test_sessions_share_the_process_node_budget():
    async def main():
        a = mux.MuxConnection(True, CFG, keepalive=False)
        b = mux.MuxConnection(False, MuxConfig(node_recv_budget=64 * MiB), keepalive=False)
        node = mux.node_budget(MuxConfig(node_recv_budget=64 * MiB))
        assert node is mux.node_budget(CFG) and node.limit == BUDGET  # the latest config's limit
        for conn in (a, b):
            conn.connection_lost(None)

    run(main())


def test_streams_ending_after_a_busy_link_trim_the_heap(monkeypatch):
    async def main():
        loop = asyncio.get_running_loop()
        trimmed = loop.create_future()
        monkeypatch.setattr(mux, "trim_heap", lambda: trimmed.done() or trimmed.set_result(True))
        monkeypatch.setattr(mux, "TRIM_AFTER_BYTES", 4 * MiB)
        monkeypatch.setattr(mux, "TRIM_DELAY", 0.0)
        monkeypatch.setattr(mux, "_HEAP_TRIM", mux._HeapTrim())
        server, client, receiver = await _link(yamux.WindowBudget(BUDGET))
        await _transfer(client, receiver, 1, 1 * MiB)
        assert not trimmed.done()  # below the threshold: no trim
        await _transfer(client, receiver, 2, 4 * MiB)
        assert await asyncio.wait_for(trimmed, 5)
        await client.close()
        server.close()
        await server.wait_closed()

    run(main())
