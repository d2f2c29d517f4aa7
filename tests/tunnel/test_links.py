"""Staying up: load spreading, failover, refusal without agents, grace,
reconnect after a relay restart or a cut link, dead-link detection."""

import asyncio
import socket

from relayd.net import run
from tests.tunnel.util import (
    echo_ok, echo_service, join_token, refused, start_agent, start_relay,
)
from tests.metric import bad_input, value
from tests.waiting import until


def test_no_agent_refused_promptly(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        assert await refused(relay.tcp_ports["echo"], timeout=2)  # the deadline: no grace period, no wait
        await relay.stop()

    run(main())


def test_grace_period_holds_until_agent_arrives(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, grace=5.0)
        async with echo_service() as svc:
            before = value("relayd_active_connections", endpoint="echo")
            pending = asyncio.ensure_future(echo_ok(relay.tcp_ports["echo"]))
            await until(lambda: value("relayd_active_connections", endpoint="echo") == before + 1, 5,
                        "the client was not held")
            assert not pending.done()
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            assert await asyncio.wait_for(pending, 10)
            await agent.stop()
        await relay.stop()

    run(main())


def test_grace_period_expires(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, grace=1.0)
        before = value("relayd_active_connections", endpoint="echo")
        failed = value("relayd_streams_failed_total", endpoint="echo", reason="no_agent")
        pending = asyncio.ensure_future(refused(relay.tcp_ports["echo"]))
        await until(lambda: value("relayd_active_connections", endpoint="echo") == before + 1, 5,
                    "the client was not held")
        assert not pending.done()  # held for the grace period ...
        assert await asyncio.wait_for(pending, 10)  # ... then refused
        assert value("relayd_streams_failed_total", endpoint="echo", reason="no_agent") == failed + 1
        await relay.stop()

    run(main())


def test_spread_over_two_agents_and_failover(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            a1 = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            a2 = await start_agent(tmp_path, "a2", join_token(relay), {"echo": ("127.0.0.1", svc)})
            port = relay.tcp_ports["echo"]
            held = []
            for _ in range(10):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"x")
                assert await r.readexactly(1) == b"x"
                held.append((r, w))
            counts = sorted(s.conn.stream_count() for s in relay.sessions.values())
            assert counts == [5, 5], counts  # least open streams first
            # One agent goes away: its streams end, new connections use the other.
            await a1.stop()
            await until(lambda: len(relay.sessions) == 1, 5)
            for _ in range(6):
                assert await echo_ok(port)
            assert a2.streams_served >= 5 + 6
            for _, w in held:
                w.close()
            await a2.stop()
        await relay.stop()

    run(main())


def test_reconnect_after_relay_restart(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        port = relay.agents_port
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            assert await echo_ok(relay.tcp_ports["echo"])
            await relay.stop()
            await until(lambda: not agent.connected.is_set(), 5)
            # Same data directory, same agent port: the agent heals by itself.
            relay = await start_relay(tmp_path, port=port)
            await until(lambda: agent.identity["agent_id"] in relay.sessions, 10)
            assert await echo_ok(relay.tcp_ports["echo"])
            assert agent.reconnects >= 1
            await agent.stop()
        await relay.stop()

    run(main())


def test_reconnect_after_link_cut_replaces_stale_session(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            aid = agent.identity["agent_id"]
            old = relay.sessions[aid]
            agent.conn.abort()  # the network drops the link under the agent
            await until(lambda: aid in relay.sessions and relay.sessions[aid] is not old, 10)
            assert old.conn.closed or old not in relay.registry.by_endpoint["echo"]
            assert relay.registry.by_endpoint["echo"] == [relay.sessions[aid]]
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())


class Blackhole:
    """A loopback TCP forwarder that can silently stop forwarding (a dead
    link that sends no FIN or RST), to test keepalive deadlines."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.dead = False
        self.writers = []

    async def start(self):
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _conn(self, r1, w1):
        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [w1, w2]

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    if not self.dead:
                        w.write(data)
            except ConnectionError:
                pass

        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

    def revive(self):
        """Forward again. Connections that lost bytes while dead (a TLS
        handshake begun then, say) can never recover: cut them, as the
        endpoints' own timeouts eventually would."""
        self.dead = False
        for w in self.writers:
            w.close()
        self.writers = []

    def close(self):
        self.server.close()
        for w in self.writers:
            w.close()


def test_dead_link_detected_by_keepalive(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        hole = Blackhole(relay.agents_port)
        hole_port = await hole.start()
        async with echo_service() as svc:
            # Enroll directly, then run the link through the forwarder.
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)}, wait=False)
            await agent.stop()
            ident_file = tmp_path / "a1" / "identity.json"
            ident_file.write_text(ident_file.read_text().replace(f":{relay.agents_port}", f":{hole_port}"))
            agent = await start_agent(tmp_path, "a1", None, {"echo": ("127.0.0.1", svc)})
            aid = agent.identity["agent_id"]
            assert await echo_ok(relay.tcp_ports["echo"])
            hole.dead = True  # no FIN, no RST: only pings can tell
            # The deadline: ping_interval 0.5 s + ping_timeout 1.5 s in these tests, with room.
            await until(lambda: aid not in relay.sessions and not agent.connected.is_set(), 4,
                        "keepalive did not detect the dead link")
            hole.revive()
            await until(lambda: aid in relay.sessions, 10)
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        hole.close()
        await relay.stop()

    run(main())


def test_unreachable_local_service_closes_only_that_connection(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, endpoints=("echo", "dead"))
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
        s.close()  # nothing listens there
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay),
                                      {"echo": ("127.0.0.1", svc), "dead": ("127.0.0.1", dead_port)})
            assert await refused(relay.tcp_ports["dead"])
            assert await echo_ok(relay.tcp_ports["echo"])
            assert agent.connected.is_set()
            await agent.stop()
        await relay.stop()

    run(main())


def test_garbage_on_agent_port_closes_only_that_connection(tmp_path):
    """Garbage after the TLS handshake: clear log line, a metric, the one
    connection closed; the agent already connected keeps working."""
    import ssl as _ssl

    from relayd.net import tls

    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            before = bad_input("agent_port", "FramingError")
            ctx = tls.client_context(str(relay.ca_path))
            for junk in (b"\xff\xff\xff\xff" + b"x" * 64, b"\x00\x00\x00\x03\xc1\xc1\xc1"):
                r, w = await asyncio.open_connection("127.0.0.1", relay.agents_port, ssl=ctx,
                                                     server_hostname="127.0.0.1")
                w.write(junk)
                try:
                    assert await asyncio.wait_for(r.read(100), 5) == b""
                except (ConnectionError, _ssl.SSLError):
                    pass
                w.close()
            assert bad_input("agent_port", "FramingError") == before + 2
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())
