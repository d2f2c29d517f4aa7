"""TLS from the agent to the service behind it, verified against the
endpoint's own trust bundle, with an optional client certificate."""

import asyncio
import ssl

import pytest

from relayd.config import AgentConfig, BackendTLS, load_agent
from relayd.control.ca import CertificateAuthority, generate_key_and_csr
from relayd.demo import echo_handler
from relayd.errors import ConfigError
from relayd.net import run
from tests.tunnel.util import exchange_ok, join_token, refused, start_agent, start_relay


def make_pki(d):
    """A back-end CA, a server certificate for 127.0.0.1, a client certificate."""
    ca = CertificateAuthority.load_or_create(d / "backend-ca", name="backend CA")
    chain, key = ca.issue_server_cert(["127.0.0.1", "localhost"])
    (d / "srv.crt").write_bytes(chain)
    (d / "srv.key").write_bytes(key)
    ckey, csr = generate_key_and_csr("client")
    (d / "cli.crt").write_bytes(ca.sign_agent_csr(csr, "relay-agent", days=1))
    (d / "cli.key").write_bytes(ckey)
    return ca


async def tls_echo(d, require_client_cert):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.crt", d / "srv.key")
    if require_client_cert:
        ctx.load_verify_locations(d / "backend-ca" / "ca.crt")
        ctx.verify_mode = ssl.CERT_REQUIRED
    srv = await asyncio.start_server(echo_handler, "127.0.0.1", 0, ssl=ctx)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize("client_cert", [False, True])
def test_tls_to_backend_with_truststore(tmp_path, client_cert):
    make_pki(tmp_path)

    async def main():
        srv, port = await tls_echo(tmp_path, require_client_cert=client_cert)
        relay = await start_relay(tmp_path)
        btls = BackendTLS(tmp_path / "backend-ca" / "ca.crt",
                          tmp_path / "cli.crt" if client_cert else None,
                          tmp_path / "cli.key" if client_cert else None)
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", port)},
                                  backend_tls={"echo": btls})
        assert await exchange_ok(relay.tcp_ports["echo"], 500_000)
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())


def test_backend_with_untrusted_certificate_refused(tmp_path):
    make_pki(tmp_path)
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", name="other CA")

    async def main():
        srv, port = await tls_echo(tmp_path, require_client_cert=False)
        relay = await start_relay(tmp_path)
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", port)},
                                  backend_tls={"echo": BackendTLS(other.cert_path)})
        assert await refused(relay.tcp_ports["echo"])
        assert agent.connected.is_set()  # only that connection failed
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())


def test_backend_requiring_client_cert_without_one_refused(tmp_path):
    make_pki(tmp_path)

    async def main():
        srv, port = await tls_echo(tmp_path, require_client_cert=True)
        relay = await start_relay(tmp_path)
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", port)},
                                  backend_tls={"echo": BackendTLS(tmp_path / "backend-ca" / "ca.crt")})
        assert not await exchange_ok(relay.tcp_ports["echo"], 1000, timeout=5)
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())


def test_backend_tls_config_file(tmp_path):
    make_pki(tmp_path)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        "[agent.endpoints]\nweb = '127.0.0.1:80'\n[agent.endpoints.db]\ntarget = '127.0.0.1:5432'\ntls = true\n"
        f"ca = '{tmp_path / 'backend-ca' / 'ca.crt'}'\ncert = '{tmp_path / 'cli.crt'}'\nkey = '{tmp_path / 'cli.key'}'\n"
        "server_name = 'localhost'\n")
    a = load_agent(cfg).validate()
    assert a.endpoints == {"web": ("127.0.0.1", 80), "db": ("127.0.0.1", 5432)}
    assert a.backend_tls["db"].server_name == "localhost"
    for bad, key in [
        ("[agent.endpoints.db]\ntarget = '127.0.0.1:1'\ntls = true\n", "agent.endpoints.db.ca"),
        ("[agent.endpoints.db]\ntls = true\nca = 'x'\n", "agent.endpoints.db.target"),
        ("[agent.endpoints.db]\ntarget = '127.0.0.1:1'\nca = 'x'\n", "agent.endpoints.db"),
        ("[agent.endpoints.db]\ntarget = '127.0.0.1:1'\ntls = true\nca = '/nonexistent'\n", "agent.endpoints.db.ca"),
        ("[agent.endpoints.db]\ntarget = '127.0.0.1:1'\ntls = true\ncolour = 'red'\n", "agent.endpoints.db.colour"),
    ]:
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_agent(cfg).validate()


def test_tls_service_that_closes_after_a_large_response(tmp_path):
    """A TLS service sends 8 MiB and closes (TLS cannot half-close): the
    client still gets every byte, then EOF."""
    make_pki(tmp_path)
    blob = bytes(range(256)) * (8 * 4096)

    async def main():
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")

        async def serve(r, w):
            await r.readexactly(5)
            w.write(blob)
            await w.drain()
            w.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
        port = srv.sockets[0].getsockname()[1]
        relay = await start_relay(tmp_path)
        agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", port)},
                                  backend_tls={"echo": BackendTLS(tmp_path / "backend-ca" / "ca.crt")})
        r, w = await asyncio.open_connection("127.0.0.1", relay.tcp_ports["echo"])
        w.write(b"hello")
        got = await asyncio.wait_for(r.read(-1), 20)
        assert got == blob
        w.close()
        await agent.stop()
        await relay.stop()
        srv.close()

    run(main())
