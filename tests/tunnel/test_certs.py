"""User-supplied certificates on the HTTPS port: SNI picks the certificate,
SIGHUP reloads them without dropping established connections."""

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys

import pytest
from cryptography import x509

from relayd.control.ca import CertificateAuthority
from relayd.net import run
from tests.tunnel.test_wss import wss_token
from tests.waiting import until_sync
from tests.tunnel.util import echo_ok, echo_service, start_agent, start_relay


def issue(tmp, ca_name, names, stem):
    """A 'public CA' and a full-chain certificate for ``names``."""
    ca = CertificateAuthority.load_or_create(tmp / ca_name, name=ca_name)
    chain, key = ca.issue_server_cert(names)
    (tmp / f"{stem}.crt").write_bytes(chain)
    (tmp / f"{stem}.key").write_bytes(key)
    return ca, tmp / f"{stem}.crt", tmp / f"{stem}.key"


async def served_cert(port, server_name, cafile):
    ctx = ssl.create_default_context(cafile=str(cafile))
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name)
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.close()
    return x509.load_der_x509_certificate(der)


def test_sni_selects_certificate_and_reload_keeps_connections(tmp_path):
    ca_a, app_crt, app_key = issue(tmp_path, "public-a", ["app.example"], "app")
    ca_b, api_crt, api_key = issue(tmp_path, "public-b", ["*.api.example"], "api")

    async def main():
        relay = await start_relay(tmp_path, https=("127.0.0.1", 0),
                                  certs=[(app_crt, app_key), (api_crt, api_key)])
        port = relay.https_port
        assert (await served_cert(port, "app.example", ca_a.cert_path)).issuer == ca_a.certificate.subject
        assert (await served_cert(port, "v1.api.example", ca_b.cert_path)).issuer == ca_b.certificate.subject
        # Any other name gets the relay's own certificate; agents over WSS are unaffected.
        assert (await served_cert(port, "127.0.0.1", relay.ca_path)).issuer == relay.ca.certificate.subject
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", wss_token(relay), {"echo": ("127.0.0.1", svc)},
                                      transport="wss")
            # An established TLS connection to app.example, held across the reload.
            ctx = ssl.create_default_context(cafile=str(ca_a.cert_path))
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="app.example")
            # Renewed certificate for app.example from another CA, then "SIGHUP".
            ca_c, _, _ = issue(tmp_path, "public-c", ["app.example"], "app")
            assert relay.reload_certs()
            assert (await served_cert(port, "app.example", ca_c.cert_path)).issuer == ca_c.certificate.subject
            with pytest.raises(ssl.SSLCertVerificationError):
                await served_cert(port, "app.example", ca_a.cert_path)
            # Nothing established was dropped.
            w.write(b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n")
            assert (await asyncio.wait_for(r.read(-1), 5)).startswith(b"HTTP/1.1 404")
            assert agent.connected.is_set() and await echo_ok(relay.tcp_ports["echo"])
            # A broken file on reload keeps the previous certificates.
            app_crt.write_text("not a certificate")
            assert not relay.reload_certs()
            assert (await served_cert(port, "app.example", ca_c.cert_path)).issuer == ca_c.certificate.subject
            await agent.stop()
        await relay.stop()

    run(main())


def test_sighup_reloads_a_running_relay(tmp_path):
    ca_a, crt, key = issue(tmp_path, "public-a", ["app.example"], "app")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    https = s.getsockname()[1]
    s.close()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"[serve]\ndata = '{tmp_path / 'relay'}'\nagents = '127.0.0.1:0'\nhttps = '127.0.0.1:{https}'\n"
                   f"[[serve.certs]]\ncert = '{crt}'\nkey = '{key}'\n")
    log = open(tmp_path / "relay.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "relayd.cli", "serve", "--config", str(cfg)], stderr=log)
    try:
        until_sync(lambda: run(served_cert(https, "app.example", ca_a.cert_path)), 15,
                   lambda: (tmp_path / "relay.log").read_text(), ignore=(OSError,), interval=0.1)
        ca_c, _, _ = issue(tmp_path, "public-c", ["app.example"], "app")
        os.kill(proc.pid, signal.SIGHUP)
        until_sync(lambda: run(served_cert(https, "app.example", ca_c.cert_path)).issuer == ca_c.certificate.subject,
                   5, "SIGHUP did not reload the certificate", ignore=(ssl.SSLError,), interval=0.1)
        assert proc.poll() is None  # still serving
        assert b"certificates reloaded" in (tmp_path / "relay.log").read_bytes()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
