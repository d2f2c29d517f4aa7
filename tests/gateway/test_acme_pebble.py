"""ACME against Debian's pebble on loopback (relayd.gateway.certs,
relayd.control.acme): certificates for the relay's own name and an HTTP
endpoint's host by HTTP-01 and by TLS-ALPN-01, validated for real by pebble
against the relay's plain-HTTP and HTTPS ports; renewal while a bystander
TLS connection keeps transferring; an ACME server down at renewal; pebble
refusing a name; a foreign account key; a directory URL that is no ACME
directory. Operations tests: the compiled pass only (marker ``once``)."""

import asyncio
import json
import logging
import os
import ssl
import re
import stat

import pytest
from cryptography import x509

from relayd.control.acme import AcmeConfig, new_account_key
from relayd.control.ca import write_private
from relayd.net import run, tls
from tests.gateway.pebble import Pebble
from tests.metric import value
from tests.tunnel.processes import free_port
from tests.tunnel.util import join_token, start_agent, start_relay
from tests.waiting import until

pytestmark = pytest.mark.once

BODY = 32 * 1024


class Backend:
    """An HTTP/1.1 service behind the agent: each request gets BODY bytes."""

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def handle(self, r, w):
        try:
            while await r.readuntil(b"\r\n\r\n"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BODY + b"x" * BODY)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()


async def tls_to(port: int, name: str, cafile=None, alpn=None):
    """(reader, writer, leaf) of a TLS connection asking for ``name``;
    verified against ``cafile`` when given."""
    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=str(cafile))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
    leaf = x509.load_der_x509_certificate(w.get_extra_info("ssl_object").getpeercert(binary_form=True))
    return r, w, leaf


async def served(port: int, name: str) -> x509.Certificate:
    r, w, leaf = await tls_to(port, name)
    w.close()
    return leaf


async def get(r, w, host: str) -> bytes:
    w.write(f"GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    return await asyncio.wait_for(r.readexactly(BODY), 10)


def sans(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def acme_cfg(peb: Pebble, challenge: str, http_port: int | None, **kw) -> AcmeConfig:
    return AcmeConfig(directory=peb.directory, email="ops@relay.test", challenge=challenge,
                      http_listen=("127.0.0.1", http_port) if http_port else None, ca=peb.ca_file, **kw).validate()


def orders(result: str) -> float:
    return value("relayd_acme_orders_total", result=result)


@pytest.mark.parametrize("challenge", ["http-01", "tls-alpn-01"])
def test_issue_for_the_relay_name_and_an_http_host(tmp_path, challenge, caplog):
    http_port, https_port = free_port(), free_port()
    valid, served_before = orders("valid"), value("relayd_acme_challenge_requests_total", challenge=challenge,
                                                  result="served")

    async def main(peb):
        cfg = acme_cfg(peb, challenge, http_port if challenge == "http-01" else None)
        relay = await start_relay(tmp_path, https=("127.0.0.1", https_port), hostname="relay.test",
                                  http={"web": "app.test"}, acme=cfg)
        await until(lambda: all(s.source == "acme" for s in relay.host_certs.names.values()), 20,
                    lambda: f"not issued: { {n: s.source for n, s in relay.host_certs.names.items()} }\n"
                            + peb.output())
        assert set(relay.host_certs.names) == {"relay.test", "app.test"}
        roots = tmp_path / "pebble-roots.pem"
        roots.write_bytes(peb.roots())
        serials = {}
        for name in ("relay.test", "app.test"):
            r, w, leaf = await tls_to(https_port, name, cafile=roots)  # chain and name verified by OpenSSL
            w.close()
            assert sans(leaf) == [name] and "Pebble" in leaf.issuer.rfc4514_string()
            serials[name] = leaf.serial_number
            assert stat.S_IMODE(os.stat(tmp_path / "relay" / "acme" / "certs" / f"{name}.pem").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "relay" / "acme" / "account.key").st_mode) == 0o600
        account = json.loads((tmp_path / "relay" / "acme" / "account.json").read_text())
        assert account["directory"] == peb.directory and account["account"].startswith("https://127.0.0.1:")
        assert orders("valid") == valid + 2
        assert value("relayd_acme_challenge_requests_total", challenge=challenge, result="served") > served_before
        # A client that trusts pebble's root reaches the HTTP endpoint through an agent.
        async with Backend() as backend:
            agent = await start_agent(tmp_path, "a1", join_token(relay, ["web"]), {"web": ("127.0.0.1", backend.port)})
            r, w, _ = await tls_to(https_port, "app.test", cafile=roots)
            assert len(await get(r, w, "app.test")) == BODY
            w.close()
            await agent.stop()
        # relayd's own clients (ALPN "relayd") still get the relay's certificate for its name.
        r, w, leaf = await tls_to(https_port, "relay.test", cafile=relay.ca_path, alpn=[tls.RELAY_ALPN, "http/1.1"])
        w.close()
        assert leaf.issuer == relay.ca.certificate.subject and "relay.test" in sans(leaf)
        # An acme-tls/1 handshake for a name without a pending challenge gets the usual certificate.
        r, w, leaf = await tls_to(https_port, "app.test", alpn=["acme-tls/1"])
        w.close()
        assert leaf.serial_number == serials["app.test"]
        await relay.stop()
        # A restart serves what it kept: no new order.
        relay = await start_relay(tmp_path, https=("127.0.0.1", https_port), hostname="relay.test",
                                  http={"web": "app.test"}, acme=cfg)
        for name, serial in serials.items():
            assert (await served(https_port, name)).serial_number == serial
        await asyncio.sleep(0.3)
        assert orders("valid") == valid + 2
        await relay.stop()

    with caplog.at_level(logging.INFO, logger="relayd.certs"), Pebble(tmp_path / "pebble", http_port, https_port) as peb:
        run(main(peb))
    issued = [r for r in caplog.records if r.getMessage() == "certificate issued by ACME"]
    assert sorted(r.host for r in issued) == ["app.test", "relay.test"]
    text = caplog.text
    key_b64 = b"".join((tmp_path / "relay" / "acme" / "account.key").read_bytes().splitlines()[1:-1]).decode()
    assert "BEGIN" not in text and key_b64[:40] not in text


def test_renewal_keeps_connections_and_survives_an_acme_outage(tmp_path, caplog):
    """Certificates of 12 s renewed 8 s before expiry: the bystander's TLS
    connection, opened on the first certificate, keeps transferring across
    the renewal; new connections get the new serial. Then pebble stops: the
    renewal fails (metric, log), the relay keeps serving the certificate it
    has and retries with backoff; a new pebble (which knows no account)
    answers the next retry."""
    http_port, https_port = free_port(), free_port()

    async def main(peb):
        cfg = acme_cfg(peb, "http-01", http_port, renew_before=8.0, retry=1.0)
        relay = await start_relay(tmp_path, https=("127.0.0.1", https_port), http={"web": "app.test"}, acme=cfg)
        state = relay.host_certs.names["app.test"]
        await until(lambda: state.source == "acme", 20, peb.output)
        first = state.serial
        roots = tmp_path / "roots.pem"
        roots.write_bytes(peb.roots())
        async with Backend() as backend:
            agent = await start_agent(tmp_path, "a1", join_token(relay, ["web"]), {"web": ("127.0.0.1", backend.port)})
            r, w, leaf = await tls_to(https_port, "app.test", cafile=roots)
            assert leaf.serial_number == first
            done = 0

            async def bystander():
                nonlocal done
                while True:
                    await get(r, w, "app.test")
                    done += 1
                    await asyncio.sleep(0.02)

            task = asyncio.create_task(bystander())
            await until(lambda: state.serial != first, 15, "not renewed")
            second = state.serial
            assert (await served(https_port, "app.test")).serial_number == second
            at_renewal = done
            await until(lambda: done >= at_renewal + 20 or task.done(), 10, "the bystander stalled")
            assert not task.done()
            assert x509.load_der_x509_certificate(w.get_extra_info("ssl_object").getpeercert(True)).serial_number \
                == first

            # The ACME server goes away before the next renewal.
            peb.stop_acme()
            errors = value("relayd_acme_errors_total", kind="network")
            failed = orders("error")
            await until(lambda: value("relayd_acme_errors_total", kind="network") >= errors + 2, 15,
                        "no failed renewal")
            assert orders("error") >= failed + 2 and state.failures >= 2
            assert (await served(https_port, "app.test")).serial_number == second
            peb.restart_acme()
            await until(lambda: state.serial not in (first, second), 15, lambda: "no renewal after the outage\n"
                        + peb.output())
            assert (await served(https_port, "app.test")).serial_number == state.serial
            assert not task.done() and done > at_renewal + 20
            task.cancel()
            w.close()
            await agent.stop()
        await relay.stop()

    with caplog.at_level(logging.INFO, logger="relayd.certs"), \
            Pebble(tmp_path / "pebble", http_port, https_port, validity=12) as peb:
        run(main(peb))
    failures = [r for r in caplog.records if r.getMessage().startswith("ACME order failed")]
    assert failures and all(r.host == "app.test" and r.kind == "network" for r in failures)
    assert failures[0].serving == "the previous ACME certificate"
    assert [r.retry_in_s for r in failures[:2]] == [1.0, 2.0]
    assert any("did not know the recorded account" in r.getMessage() for r in caplog.records)
    assert [r.getMessage() for r in caplog.records].count("certificate renewed by ACME") >= 2


def test_hostile_acme_cases(tmp_path, caplog):
    """pebble refuses a name (its block list) and fails a validation it
    cannot make; a valid key of another account in account.key; a directory
    URL that answers no directory. The relay serves throughout."""
    http_port, https_port = free_port(), free_port()

    async def main(peb):
        # 1. blocked.test is refused at newOrder; app.test is issued.
        cfg = acme_cfg(peb, "http-01", http_port, retry=30.0)
        refused = orders("refused")
        relay = await start_relay(tmp_path, https=("127.0.0.1", https_port),
                                  http={"web": "app.test", "blocked": "blocked.test"}, acme=cfg)
        names = relay.host_certs.names
        await until(lambda: names["app.test"].source == "acme" and names["blocked.test"].failures, 20, peb.output)
        assert names["blocked.test"].source == "host"  # the relay CA's, until ACME's comes
        assert sans(await served(https_port, "blocked.test")) == ["blocked.test"]
        assert orders("refused") == refused + 1
        assert value("relayd_acme_errors_total", kind="rejectedIdentifier") >= 1
        await relay.stop()

        # 2. A validation pebble cannot make (nothing answers on the port pebble validates on).
        other = free_port()
        cfg2 = acme_cfg(peb, "http-01", other, retry=30.0)
        relay = await start_relay(tmp_path / "b", https=("127.0.0.1", https_port), http={"web": "lost.test"},
                                  acme=cfg2)
        await until(lambda: relay.host_certs.names["lost.test"].failures, 20, peb.output)
        assert value("relayd_acme_errors_total", kind="connection") + \
            value("relayd_acme_errors_total", kind="unauthorized") >= 1
        await relay.stop()

        # 3. account.key replaced by a valid key of no account: registered, and it issues.
        keyfile = tmp_path / "relay" / "acme" / "account.key"
        write_private(keyfile, new_account_key())
        before = json.loads((tmp_path / "relay" / "acme" / "account.json").read_text())["account"]
        (tmp_path / "relay" / "acme" / "certs" / "app.test.pem").unlink()
        relay = await start_relay(tmp_path, https=("127.0.0.1", https_port), http={"web": "app.test"}, acme=cfg)
        await until(lambda: relay.host_certs.names["app.test"].source == "acme", 20, peb.output)
        after = json.loads((tmp_path / "relay" / "acme" / "account.json").read_text())["account"]
        assert after != before
        await relay.stop()

        # 4. A directory URL that is no ACME directory: pebble's management root (a PEM, not JSON).
        bad = AcmeConfig(directory=f"https://127.0.0.1:{peb.mgmt_port}/roots/0", http_listen=("127.0.0.1", http_port),
                         ca=peb.ca_file, retry=30.0).validate()
        errors = value("relayd_acme_errors_total", kind="bad_response")
        relay = await start_relay(tmp_path / "c", https=("127.0.0.1", https_port), http={"web": "app.test"}, acme=bad)
        await until(lambda: relay.host_certs.names["app.test"].failures, 10)
        assert value("relayd_acme_errors_total", kind="bad_response") == errors + 1
        assert relay.host_certs.names["app.test"].source == "host"
        await relay.stop()

    with caplog.at_level(logging.WARNING, logger="relayd.certs"), \
            Pebble(tmp_path / "pebble", http_port, https_port, blocklist=("blocked.test",)) as peb:
        run(main(peb))
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ACME order failed")]
    assert any("rejectedIdentifier" in m and "blocked.test" in m for m in msgs), msgs
    assert any("lost.test" in m for m in msgs), msgs
    assert any("/roots/0: answer is not JSON" in m for m in msgs), msgs
    assert not re.search(r"acme-challenge/[A-Za-z0-9_-]{16}", caplog.text)  # the CA's text quoted the token
