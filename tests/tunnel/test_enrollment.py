"""Join-token enrollment and mTLS identity, against a real relay on loopback."""

import asyncio
import ssl

import pytest

from relayd.agent import AgentNode, EnrollmentError
from relayd.config import AgentConfig
from relayd.core import wire
from relayd.control.jointoken import JoinToken
from relayd.net import run
from relayd.net import tls
from relayd.net.preamble import ClientPreamble
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.waiting import until


def test_enroll_then_tunnel_then_restart_without_token(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            token = join_token(relay, ["echo"])
            agent = await start_agent(tmp_path, "a1", token, {"echo": ("127.0.0.1", svc)})
            ident = agent.identity
            assert ident["agent_id"].startswith("ag-")
            # The private key never left: the relay has only the certificate.
            key = (tmp_path / "a1" / "agent.key")
            assert key.stat().st_mode & 0o777 == 0o600
            assert b"PRIVATE KEY" not in (tmp_path / "relay" / "relayd.db").read_bytes()
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
            # A second start needs no token: the stored identity is used.
            agent2 = await start_agent(tmp_path, "a1", None, {"echo": ("127.0.0.1", svc)})
            assert agent2.identity["agent_id"] == ident["agent_id"]
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent2.stop()
        await relay.stop()

    run(main())


def _agent(tmp_path, name, token, **kw):
    return AgentNode(AgentConfig(data=tmp_path / name, join=token, endpoints={"echo": ("127.0.0.1", 9)}, **kw))


def test_reused_token_refused(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay)
        await _agent(tmp_path, "a1", token).enroll(token)
        with pytest.raises(EnrollmentError, match="already used"):
            await _agent(tmp_path, "a2", token).enroll(token)
        await relay.stop()

    run(main())


def test_expired_token_refused(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay, ttl=0.2)
        await asyncio.sleep(0.4)  # kept: the point: the token's time to live passes
        with pytest.raises(EnrollmentError, match="expired"):
            await _agent(tmp_path, "a1", token).enroll(token)
        await relay.stop()

    run(main())


def test_tampered_secret_refused_and_token_survives(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay)
        t = JoinToken.decode(token)
        forged = JoinToken(t.address, t.pin, t.token_id, t.secret[:-4] + "AAAA").encode()
        with pytest.raises(EnrollmentError, match="does not match"):
            await _agent(tmp_path, "a1", forged).enroll(forged)
        # The failed attempt did not burn the real token.
        await _agent(tmp_path, "a2", token).enroll(token)
        await relay.stop()

    run(main())


def test_wrong_pin_aborts_before_sending_the_secret(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay)
        t = JoinToken.decode(token)
        wrong = JoinToken(t.address, "sha256:" + "0" * 64, t.token_id, t.secret).encode()
        with pytest.raises(EnrollmentError, match="CA pin mismatch"):
            await _agent(tmp_path, "a1", wrong).enroll(wrong)
        assert not (tmp_path / "a1" / "agent.crt").exists()
        # The secret never reached the relay: the token is still unused.
        await _agent(tmp_path, "a2", token).enroll(token)
        await relay.stop()

    run(main())


def test_token_of_another_relay(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        other = await start_relay(tmp_path / "other")
        token = join_token(other)
        t = JoinToken.decode(token)
        aimed = JoinToken(f"127.0.0.1:{relay.agents_port}", t.pin, t.token_id, t.secret).encode()
        with pytest.raises(EnrollmentError, match="CA pin mismatch"):
            await _agent(tmp_path, "a1", aimed).enroll(aimed)
        await relay.stop()
        await other.stop()

    run(main())


def test_racing_agents_one_token_exactly_one_wins(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay)
        results = await asyncio.gather(*(_agent(tmp_path, f"r{i}", token).enroll(token) for i in range(6)),
                                       return_exceptions=True)
        wins = [r for r in results if isinstance(r, dict)]
        losses = [r for r in results if isinstance(r, EnrollmentError)]
        assert len(wins) == 1 and len(losses) == 5, results
        await relay.stop()

    run(main())


def test_endpoint_restriction_from_token(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, endpoints=("echo", "db"))
        token = join_token(relay, ["echo"])
        agent = _agent(tmp_path, "a1", token)
        agent.cfg.endpoints = {"db": ("127.0.0.1", 9)}
        await agent.start()
        # The relay refuses the link (the token allows echo only): the agent tries again, never connected.
        await until(lambda: agent.reconnects >= 2, 10, "the agent did not retry after a refusal")
        assert not agent.connected.is_set()
        await agent.stop()
        await relay.stop()

    run(main())


def test_unknown_certificate_refused_by_tls(tmp_path):
    """A certificate from another CA does not get past the TLS handshake."""

    async def main():
        relay = await start_relay(tmp_path)
        other = await start_relay(tmp_path / "other")
        async with echo_service() as svc:
            stranger = await start_agent(tmp_path, "s", join_token(other), {"echo": ("127.0.0.1", svc)})
            await stranger.stop()
        d = tmp_path / "s"
        ctx = tls.client_context(str(relay.ca_path), cert_file=str(d / "agent.crt"), key_file=str(d / "agent.key"))
        loop = asyncio.get_running_loop()
        pre = ClientPreamble(wire.TunnelRequest(("echo",)))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
            await loop.create_connection(lambda: pre, "127.0.0.1", relay.agents_port, ssl=ctx,
                                         server_hostname="127.0.0.1")
            await asyncio.wait_for(pre.reply, 5)
        # Without any certificate, a tunnel is refused with a clear reply.
        pre = ClientPreamble(wire.TunnelRequest(("echo",)))
        t, _ = await loop.create_connection(lambda: pre, "127.0.0.1", relay.agents_port,
                                            ssl=tls.client_context(str(relay.ca_path)), server_hostname="127.0.0.1")
        reply = await asyncio.wait_for(pre.reply, 5)
        assert not reply["ok"] and reply["code"] == wire.UNAUTHORIZED and "client certificate" in reply["error"]
        t.close()
        await relay.stop()
        await other.stop()

    run(main())


def test_revocation_cuts_live_link_within_a_second(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            aid = agent.identity["agent_id"]
            # A long-lived public connection through the tunnel.
            r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            # As `relayd admin revoke-agent` does, from outside the relay's loop.
            from relayd.control.store import Store

            admin = Store(tmp_path / "relay" / "relayd.db")
            assert admin.revoke_agent(aid)
            admin.close()
            with pytest.raises(ConnectionResetError):  # the live stream was cut: a reset, not an EOF
                await asyncio.wait_for(r.read(100), 3)  # the deadline: the revocation poll runs every second
            await until(lambda: aid not in relay.sessions, 2)
            # The agent's certificate is refused from now on: its next attempt is refused and it gives up.
            with pytest.raises(wire.Refusal) as refusal:
                await asyncio.wait_for(agent.wait(), 10)
            assert refusal.value.code == wire.REVOKED
            assert aid not in relay.sessions
            w.close()
            await agent.stop()
        await relay.stop()

    run(main())


def test_certificate_renewal_keeps_traffic_flowing(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            nb, na = agent.cert_lifetime()
            old = (tmp_path / "a1" / "agent.crt").read_bytes()
            r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
            w.write(b"before")
            assert await r.readexactly(6) == b"before"
            await agent.renew()
            assert (tmp_path / "a1" / "agent.crt").read_bytes() != old
            # The link and the open stream were not touched.
            w.write(b"after")
            assert await r.readexactly(5) == b"after"
            w.close()
            # The next link uses the new certificate, which the relay accepts.
            aid = agent.identity["agent_id"]
            old_conn = relay.sessions[aid].conn
            old_conn.abort()
            await until(lambda: aid in relay.sessions and relay.sessions[aid].conn is not old_conn
                           and agent.connected.is_set(), 10)
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())


def test_certificate_renews_itself_before_expiry(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, agent_cert_ttl=6.0)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            first = (tmp_path / "a1" / "agent.crt").read_bytes()
            # notBefore is backdated 5 min, so 2/3 of the lifetime is already past: renew soon.
            await until(lambda: (tmp_path / "a1" / "agent.crt").read_bytes() != first, 8)
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())


def test_token_for_another_relay_reenrolls_same_relay_ignored(tmp_path):
    async def main():
        r1 = await start_relay(tmp_path / "one")
        async with echo_service() as svc:
            a = await start_agent(tmp_path, "a", join_token(r1), {"echo": ("127.0.0.1", svc)})
            first = a.identity["agent_id"]
            await a.stop()
            # Same relay, fresh token: the stored identity is kept.
            a = await start_agent(tmp_path, "a", join_token(r1), {"echo": ("127.0.0.1", svc)})
            assert a.identity["agent_id"] == first
            await a.stop()
            await r1.stop()
            # A token for another relay: enroll there.
            r2 = await start_relay(tmp_path / "two")
            a = await start_agent(tmp_path, "a", join_token(r2), {"echo": ("127.0.0.1", svc)})
            assert a.identity["agent_id"] != first and a.identity["relay"] == f"127.0.0.1:{r2.agents_port}"
            assert await echo_ok(r2.tcp_ports["echo"])
            await a.stop()
            await r2.stop()

    run(main())
