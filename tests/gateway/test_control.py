"""Streams in both directions on an agent link: the relay pushes control
messages to an agent, an agent sends its own to the relay, and a stream of a
kind a side does not take is refused without harm to the link."""

import logging


from relayd.core import wire
from relayd.core.framing import encode_message
from relayd.net import run
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.metric import value
from tests.waiting import until


def test_relay_pushes_and_agent_sends_control_messages(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            aid = agent.identity["agent_id"]
            got_agent, got_relay = [], []
            agent.on_control("notice", got_agent.append)
            relay.on_control("status", lambda who, msg: got_relay.append((who, msg)))
            for i in range(3):
                assert await relay.push(aid, "notice", n=i)
            assert await relay.push(aid, "nobody-handles-this")
            await until(lambda: len(got_agent) == 3, 5)
            assert [m["n"] for m in got_agent] == [0, 1, 2]
            assert await agent.push("status", load=0.5)
            await until(lambda: got_relay, 5)
            assert got_relay == [(aid, {"type": "status", "load": 0.5})]
            assert await echo_ok(relay.tcp_ports["echo"])  # the data path is unaffected
            assert not await relay.push("ag-000000000000", "notice")  # not connected
            await agent.stop()
        await relay.stop()

    run(main())


def test_streams_of_a_kind_not_taken_are_refused(tmp_path, caplog):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            before = value("relayd_bad_input_total", where="agent_link", kind="stream_kind_refused")
            # The agent opens a tcp stream toward the relay: refused, link fine.
            st = agent.conn.open_stream_nowait()
            st.send_nowait(wire.StreamHeader(wire.KIND_TCP, "echo", "t").encode())
            await until(lambda: st.at_eof, 5)
            assert value("relayd_bad_input_total", where="agent_link", kind="stream_kind_refused") == before + 1
            # The relay side speaks another version: the agent refuses, naming both.
            sess = relay.sessions[agent.identity["agent_id"]]
            st2 = sess.conn.open_stream_nowait()
            with caplog.at_level(logging.WARNING, logger="relayd.agent"):
                st2.send_nowait(encode_message({"v": 2, "k": "tcp", "t": "echo", "tr": "x"}))
                await until(lambda: st2.at_eof, 5)
            assert any("link protocol 2; this side speaks 1" in str(r.__dict__.get("error")) for r in caplog.records)
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())
