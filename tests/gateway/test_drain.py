"""Planned stops that drop nothing: a node that stops sends GoAway, takes no
new streams, and lets the open ones finish for its drain time; an agent that
drains sends the relay GoAway and the relay sends new streams to its other
agents meanwhile."""

import asyncio
import os
import time

from relayd.net import run
from tests.gateway.devices import relay_with_https
from tests.gateway.test_devicereg import enrolled_device
from tests.tunnel.util import echo_service, join_token, start_agent, start_relay
from tests.waiting import until


async def echo_once(r, w, size=100_000) -> bool:
    payload = os.urandom(size)
    w.write(payload)
    return await asyncio.wait_for(r.readexactly(size), 10) == payload


def test_relay_stop_lets_open_streams_finish(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        port = relay.tcp_ports["echo"]
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await echo_once(r, w)
            link = relay.sessions[agent.identity["agent_id"]].conn
            # A drain time far longer than the deadline below: stop must end when the stream does.
            stopping = asyncio.ensure_future(relay.stop(drain=60.0))
            await until(lambda: not link.accepting_streams, 5, "the relay sent no GoAway")
            # Draining: the listener is closed, the open stream still works.
            try:
                await asyncio.open_connection("127.0.0.1", port)
                raise AssertionError("a new connection was accepted while draining")
            except ConnectionRefusedError:
                pass
            assert await echo_once(r, w)
            assert not stopping.done()
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b""  # a clean end, not a cut
            w.close()
            await asyncio.wait_for(stopping, 10)  # done when the stream was, not at the end of the drain time
            await agent.stop()

    run(main())


def test_relay_stop_cuts_what_outlives_the_drain_time(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
            assert await echo_once(r, w)
            await relay.stop(drain=0.5)
            try:
                data = await asyncio.wait_for(r.read(), 5)
                raise AssertionError(f"clean end after the drain time: {data!r}")
            except ConnectionResetError:
                pass
            w.close()
            await agent.stop()

    run(main())


def test_a_draining_agent_gets_no_new_streams(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        port = relay.tcp_ports["echo"]
        async with echo_service() as svc:
            a = await start_agent(tmp_path, "a", join_token(relay), {"echo": ("127.0.0.1", svc)})
            r, w = await asyncio.open_connection("127.0.0.1", port)  # on a: the only agent
            assert await echo_once(r, w)
            b = await start_agent(tmp_path, "b", join_token(relay), {"echo": ("127.0.0.1", svc)})
            served_a, served_b = a.streams_served, b.streams_served
            draining = asyncio.ensure_future(a.stop(drain=5.0))
            await until(lambda: not relay.sessions[a.identity["agent_id"]].conn.accepting_streams, 5)
            for _ in range(6):  # new connections all go to b
                r2, w2 = await asyncio.open_connection("127.0.0.1", port)
                assert await echo_once(r2, w2, 1000)
                w2.close()
            assert a.streams_served == served_a and b.streams_served == served_b + 6
            assert await echo_once(r, w)  # a's open stream goes on meanwhile
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await asyncio.wait_for(draining, 5)
            await b.stop()
        await relay.stop()

    run(main())


def test_control_streams_hold_no_drain(tmp_path):
    """A device's link carries a control stream each way for as long as it
    lives (the relay's pushes: device token, claim code; the agent's acks).
    A planned stop waits for traffic, not for them: it used to last the
    whole drain time (SIGTERM to a device agent took 10 s)."""
    async def main():
        relay = await relay_with_https(tmp_path)
        try:
            async with echo_service() as svc:
                dev = await enrolled_device(tmp_path, relay, "cam", {"echo": ("127.0.0.1", svc)})
                await until(dev.claim_code_file.exists, 10, "claim code")
                link = relay.sessions[dev.identity["agent_id"]].conn
                # both control streams are open: the relay's, and the agent's own (the ack)
                await until(lambda: dev.conn.stream_count() == 2 and link.stream_count() == 2, 10,
                            lambda: f"control streams: {dev.conn.stream_count()}, {link.stream_count()}")
                r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
                assert await echo_once(r, w)
                started = time.monotonic()
                stopping = asyncio.ensure_future(dev.stop(drain=60.0))
                await until(lambda: not link.accepting_streams, 5, "the agent sent no GoAway")
                assert await echo_once(r, w)  # the data stream holds the drain
                assert not stopping.done()
                w.write_eof()
                assert await asyncio.wait_for(r.read(), 5) == b""
                w.close()
                await asyncio.wait_for(stopping, 5)  # then the control streams do not
                assert time.monotonic() - started < 5
                # the relay's side: a stop with a device connected and idle ends at once
                dev2 = await enrolled_device(tmp_path, relay, "cam2", {"echo": ("127.0.0.1", svc)})
                await until(dev2.claim_code_file.exists, 10, "claim code")
                link2 = relay.sessions[dev2.identity["agent_id"]].conn
                await until(lambda: link2.stream_count() == 2, 10, "control streams")
                started = time.monotonic()
                await asyncio.wait_for(relay.stop(drain=60.0), 5)
                assert time.monotonic() - started < 5
                await dev2.stop()
        finally:
            await relay.stop()

    run(main())
