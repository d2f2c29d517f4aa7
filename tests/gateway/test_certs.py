"""relayd.gateway.certs without an ACME server: every HTTP endpoint's host
gets a certificate of the relay's CA that names it (checked per SNI name),
kept across restarts and reloads; a certificate file still wins; relayd's
own clients keep the relay's certificate where a public one answers for the
relay's name; an ACME server that cannot be reached leaves the relay
serving, counted and logged, retrying with backoff; the plain-HTTP
listener answers only what it must."""

import asyncio
import dataclasses
import logging
import os
import ssl
import stat
import time

import pytest
from prometheus_client import REGISTRY
from cryptography import x509

from relayd.control.acme import AcmeConfig
from relayd.control.jointoken import JoinToken
from relayd.net import run
from tests.metric import bad_input, value
from tests.tunnel.processes import free_port
from tests.tunnel.test_certs import issue, served_cert
from tests.tunnel.util import echo_ok, echo_service, start_agent, start_relay
from tests.waiting import until


def sans(cert: x509.Certificate) -> list[str]:
    return [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.DNSName)]


async def verifies(port: int, name: str, cafile) -> bool:
    """A handshake that checks the chain against ``cafile`` and the name."""
    try:
        await served_cert(port, name, cafile)
        return True
    except ssl.SSLCertVerificationError:
        return False


def test_every_http_host_gets_a_certificate_naming_it(tmp_path):
    ca_pub, pub_crt, pub_key = issue(tmp_path, "public", ["files.example"], "files")

    async def main():
        http = {"web": "app.example", "api": "API.example/v1", "files": "files.example"}
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0), hostname="relay.example", http=http,
                                  certs=[(pub_crt, pub_key)])
        port, ca = relay.https_port, relay.ca_path
        for name in ("app.example", "api.example"):
            cert = await served_cert(port, name, ca)
            assert sans(cert) == [name] and cert.issuer == relay.ca.certificate.subject
            assert await verifies(port, name, ca)
            path = tmp_path / "relay" / "certs" / f"{name}.pem"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert REGISTRY.get_sample_value("relayd_certificate_expiry_timestamp_seconds",
                                             {"cert": "host", "name": name}) == cert.not_valid_after_utc.timestamp()
        # The relay's own names are on its server certificate; a file's name keeps the file's certificate.
        assert "relay.example" in sans(await served_cert(port, "relay.example", ca))
        assert (await served_cert(port, "files.example", ca_pub.cert_path)).issuer == ca_pub.certificate.subject
        assert not (tmp_path / "relay" / "certs" / "files.example.pem").exists()
        # A name nobody configured gets the relay's certificate, which does not name it.
        assert not await verifies(port, "other.example", ca)
        serial = (await served_cert(port, "app.example", ca)).serial_number
        await relay.stop()

        # A restart serves the same certificates; a reload adds and drops hosts.
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0), hostname="relay.example", http=http,
                                  certs=[(pub_crt, pub_key)])
        port = relay.https_port
        assert (await served_cert(port, "app.example", ca)).serial_number == serial
        cfg = dataclasses.replace(relay.cfg, http={"web": "app.example", "new": "new.example/x"})
        await relay.reload(cfg)
        assert sans(await served_cert(port, "new.example", ca)) == ["new.example"]
        assert await verifies(port, "new.example", ca) and not await verifies(port, "api.example", ca)
        assert (await served_cert(port, "app.example", ca)).serial_number == serial
        await relay.stop()

    run(main())


def test_relay_clients_keep_the_relay_certificate_behind_a_public_one(tmp_path):
    """A certificate file for the relay's own name (as an ACME one would be):
    browsers get it; an agent over WSS, which verifies the relay against its
    CA, offers ALPN "relayd" and gets the relay's own."""
    ca_pub, crt, key = issue(tmp_path, "public", ["localhost"], "own")

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0), certs=[(crt, key)])
        assert relay.host_certs.peeking
        assert (await served_cert(relay.https_port, "localhost", ca_pub.cert_path)).issuer \
            == ca_pub.certificate.subject
        token_id, secret = relay.store.create_join_token([], 900)
        token = JoinToken(f"localhost:{relay.https_port}", relay.ca.pin, token_id, secret).encode()
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", token, {"echo": ("127.0.0.1", svc)}, transport="wss")
            assert agent.identity["server_hostname"] == "localhost"
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.stop()
        await relay.stop()

    run(main())


def test_unreachable_acme_server_keeps_serving_and_retries(tmp_path, caplog):
    """The directory refuses connections: the HTTP host keeps the relay CA's
    certificate, each failure is counted and logged, retries back off."""
    dead = free_port()
    http_port = free_port()
    # Shorter retries than the config allows (1s at least), to see the backoff quickly.
    acme = AcmeConfig(directory=f"https://127.0.0.1:{dead}/dir", http_listen=("127.0.0.1", http_port),
                      retry=0.2, retry_max=0.8)
    errors = value("relayd_acme_errors_total", kind="network")
    failed = value("relayd_acme_orders_total", result="error")

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0), hostname="relay.example",
                                  http={"web": "app.example"}, acme=acme)
        await until(lambda: value("relayd_acme_errors_total", kind="network") >= errors + 6, 15, "no retries")
        st = relay.host_certs.names["app.example"]
        assert st.source == "host" and st.failures >= 3
        # Backoff: 0.2, 0.4, 0.8, 0.8 ... (retry_max), per name.
        assert st.next_at - time.time() <= 0.8 + 0.1
        assert sans(await served_cert(relay.https_port, "app.example", relay.ca_path)) == ["app.example"]
        assert value("relayd_acme_orders_total", result="error") >= failed + 6
        # The plain-HTTP listener: a challenge nobody asked for, a redirect, bad input.
        r, w = await asyncio.open_connection("127.0.0.1", http_port)
        w.write(b"GET /.well-known/acme-challenge/" + b"A" * 43 + b" HTTP/1.1\r\nHost: app.example\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 404 ")
        r, w = await asyncio.open_connection("127.0.0.1", http_port)
        w.write(b"GET /a/b?c=d HTTP/1.1\r\nHost: app.example:80\r\n\r\n")
        head = await asyncio.wait_for(r.read(), 5)
        assert head.startswith(b"HTTP/1.1 308 ") and \
            f"\r\nLocation: https://app.example:{relay.https_port}/a/b?c=d\r\n".encode() in head
        bad = bad_input("acme_http", "bad_head")
        for junk in (b"GET / HTTP/1.1\nHost: x\n\n", b"\x16\x03\x01\x02\x00" + b"\x01" * 100,
                     b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000):
            r, w = await asyncio.open_connection("127.0.0.1", http_port)
            w.write(junk)
            assert (await asyncio.wait_for(r.read(), 5)).split(b" ", 2)[1] in (b"400", b"431")
        assert bad_input("acme_http", "bad_head") >= bad + 3
        await relay.stop()

    with caplog.at_level(logging.WARNING, logger="relayd.certs"):
        run(main())
    lines = [r for r in caplog.records if r.getMessage().startswith("ACME order failed")]
    assert lines and lines[0].host in ("relay.example", "app.example") and lines[0].kind == "network"
    assert "relay CA" in lines[0].serving or "relay's certificate" in lines[0].serving


@pytest.mark.parametrize("mode, data, why", [
    (0o600, b"garbage", "is not an unencrypted PEM private key"),
    (0o644, None, "accessible by group or others"),
], ids=["garbage", "mode-644"])
def test_unusable_account_key_stops_the_start(tmp_path, mode, data, why):
    acme = AcmeConfig(directory="https://127.0.0.1:9/dir", http_listen=None, challenge="tls-alpn-01").validate()
    keyfile = tmp_path / "relay" / "acme" / "account.key"

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0), acme=acme)
        await relay.stop()
        if data is not None:
            keyfile.write_bytes(data)
        os.chmod(keyfile, mode)
        with pytest.raises(Exception, match=why) as exc:
            await start_relay(tmp_path, https=("127.0.0.1", 0), acme=acme)
        assert "garbage" not in str(exc.value)

    run(main())
