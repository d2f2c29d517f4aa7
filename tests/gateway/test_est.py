"""Device provisioning (issue 13 items 1 and 2): OTPs from the admin API,
NVIDIA's PROV-ADMIN paths and the CLI; EST on the relay's HTTPS port driven
by real, independent clients (curl + openssl, strongSwan's pki) and by a real
`relayd agent --otp --est` process whose tunnel then carries traffic.
Every hostile request is refused, counted and logged without OTP or payload
while a bystander stream through another agent stays intact."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import signal
import sys
import time

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from relayd.control.provisioning import Otps
from relayd.net import run
from tests.gateway.devices import https, relay_with_https
from tests.metric import bad_input, value
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.waiting import until

OTPS = "/api/v1/admin/otps"
EST = "/.well-known/est"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_tools = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")),
                                 reason="curl and openssl (scripts/test.sh installs them)")


async def sh(*args, stdin: bytes | None = None, timeout: float = 20, env=None) -> tuple[int, bytes, bytes]:
    # No stdin pipe unless there is input: uvloop raises when communicate()
    # writes to a pipe the process already closed by exiting.
    p = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(p.communicate(stdin), timeout)
    except asyncio.TimeoutError:
        p.kill()
        await p.wait()
        raise
    return p.returncode, out, err


def admin_key(tmp_path) -> str:
    return (tmp_path / "relay" / "admin-api.key").read_text().strip()


async def new_otp(relay, key: str, **body) -> dict:
    status, _, b = await https(relay, "POST", OTPS, orjson.dumps(body),
                               {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    assert status == 201, b
    return orjson.loads(b)


def csr_der(tmp_path, name: str = "k") -> tuple[bytes, bytes]:
    """(CSR as DER, key PEM) made by cryptography (for hostile variants)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


async def openssl_csr(tmp_path, name: str) -> str:
    """An EC key and a CSR by openssl; the path of the CSR's base64 (wrapped
    at 64 columns, as `openssl base64` writes it)."""
    key, der, b64 = (str(tmp_path / f"{name}.{x}") for x in ("key", "der", "b64"))
    assert (await sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key))[0] == 0
    assert (await sh("openssl", "req", "-new", "-key", key, "-subj", f"/CN={name}", "-outform", "DER",
                     "-out", der))[0] == 0
    assert (await sh("openssl", "base64", "-in", der, "-out", b64))[0] == 0
    return b64


async def curl(relay, path: str, *args: str) -> tuple[int, dict, bytes]:
    """curl against the relay's HTTPS port: (status, headers, body)."""
    url = f"https://127.0.0.1:{relay.https_port}{path}"
    rc, out, err = await sh("curl", "-sS", "-D", "-", "--max-time", "15", "--cacert", str(relay.ca_path), *args, url)
    assert rc == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 100"):
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}, body


async def pki_request(tmp_path, name: str) -> tuple[str, str]:
    """An ECDSA P-256 key and a PKCS#10 request for CN=``name``, both made
    by strongSwan's pki (DER): (key path, request path)."""
    rc, key, err = await sh("pki", "--gen", "--type", "ecdsa", "--size", "256", "--outform", "der")
    assert rc == 0, err
    (tmp_path / f"{name}.key.der").write_bytes(key)
    rc, req, err = await sh("pki", "--req", "--in", str(tmp_path / f"{name}.key.der"), "--type", "ecdsa",
                            "--dn", f"CN={name}", "--outform", "der")
    assert rc == 0, err
    (tmp_path / f"{name}.req.der").write_bytes(req)
    return str(tmp_path / f"{name}.key.der"), str(tmp_path / f"{name}.req.der")


async def pki_est(url: str, tls_ca: str, req: str, *auth: str) -> tuple[int, bytes, bytes]:
    """strongSwan's EST client: `pki --est` of the request ``req`` at the
    relay ``url`` (TLS verified by ``tls_ca``), with ``auth`` (--userpass,
    or --cert and --key to re-enroll); stdout: the certificate (PEM)."""
    return await sh("pki", "--est", "--url", url, "--in", req, "--cacert", tls_ca, *auth, "--outform", "pem",
                    timeout=30)


def issued(body: bytes) -> x509.Certificate:
    assert b"\n" not in body.strip() and b"\r" not in body  # one unbroken base64 line
    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    assert len(certs) == 1
    return certs[0]


def device_of(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert f"urn:relayd:device:{cn}" in uris
    return cn


async def bystander(port: int, seconds: float, stop: asyncio.Event | None = None) -> bool:
    """A stream through the tunnel that stays open while the hostile
    requests go on (``seconds``, or until ``stop``, at most 60 s): every
    echoed byte must come back intact."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    h_out, h_in = hashlib.sha256(), hashlib.sha256()
    try:
        end = time.monotonic() + (60 if stop is not None else seconds)
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            chunk = os.urandom(8192)
            h_out.update(chunk)
            w.write(chunk)
            h_in.update(await asyncio.wait_for(r.readexactly(len(chunk)), 5))
            await asyncio.sleep(0.02)
    finally:
        w.close()
    return h_out.digest() == h_in.digest()


@needs_tools
def test_otps_and_enrollment_with_curl(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main():
        relay = await relay_with_https(tmp_path)
        key = admin_key(tmp_path)
        # -- the admin side: JSON API (Bearer and PROV-ADMIN), NVIDIA's paths
        status, _, b = await curl(relay, OTPS, "-X", "POST", "-H", f"Authorization: PROV-ADMIN {key}",
                                  "-H", "Content-Type: application/json",
                                  "--data", '{"device_name": "cam-01", "ttl": "1h", "labels": {"site": "a"}}')
        assert status == 201, b
        doc = orjson.loads(b)
        assert len(doc["otp"]) == 26 and set(doc["otp"]) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
        assert doc["est_url"] == f"https://127.0.0.1:{relay.https_port}/.well-known/est"
        assert doc["ca_sha256"] == relay.ca.pin.removeprefix("sha256:") and doc["expires_at"].endswith("Z")
        row = relay.store.query("SELECT otp_sha256 FROM dc_otps WHERE id = ?", (doc["otp_id"],))[0]
        assert row[0] == hashlib.sha256(doc["otp"].encode()).hexdigest()  # only the hash is kept
        for path in ("/admin/api/otp", "/api/otp"):
            status, h, bare = await curl(relay, path, "-H", f"Authorization: PROV-ADMIN {key}")
            assert status == 200 and h["content-type"].startswith("text/plain") and len(bare) == 26, bare
            status, h, j = await curl(relay, path, "-H", f"Authorization: PROV-ADMIN {key}",
                                      "-H", "Accept: application/json")
            assert status == 200 and set(orjson.loads(j)) >= {"otp_id", "otp", "est_url", "ca_sha256"}
        for auth in ("PROV-ADMIN wrong", "Basic Zm9vOmJhcg==", None):
            before = bad_input("provisioning", "bad_key") + bad_input("provisioning", "no_key")
            status, h, _ = await curl(relay, "/admin/api/otp", *(["-H", f"Authorization: {auth}"] if auth else []))
            assert status == 401 and "www-authenticate" in h
            assert bad_input("provisioning", "bad_key") + bad_input("provisioning", "no_key") == before + 1
        assert (await curl(relay, "/admin/api/otp", "-I", "-H", f"Authorization: PROV-ADMIN {key}"))[0] == 405
        assert (await https(relay, "POST", OTPS, b'{"ttl": "8d"}', {"Content-Type": "application/json",
                                                                   "Authorization": f"Bearer {key}"}))[0] == 422
        # the admin networks: 403 from anywhere else, before the key is looked at
        relay.provisioning.allow = (__import__("ipaddress").ip_network("10.0.0.0/8"),)
        before = bad_input("provisioning", "network")
        assert (await curl(relay, "/admin/api/otp", "-H", f"Authorization: PROV-ADMIN {key}"))[0] == 403
        assert (await https(relay, "POST", OTPS, b"{}", {"Content-Type": "application/json",
                                                        "Authorization": f"Bearer {key}"}))[0] == 403
        assert bad_input("provisioning", "network") == before + 2
        relay.provisioning.allow = (__import__("ipaddress").ip_network("127.0.0.0/8"),)
        otp_basic = doc["otp"]
        otp_bearer = (await new_otp(relay, key))["otp"]
        otp_lower = (await new_otp(relay, key))["otp"]

        # -- cacerts, read by openssl
        status, h, body = await curl(relay, EST + "/cacerts")
        assert status == 200 and h["content-type"] == "application/pkcs7-mime"[:len(h["content-type"])] or \
            h["content-type"].startswith("application/pkcs7-mime")
        assert h["content-transfer-encoding"] == "base64" and b"\n" not in body
        rc, pem, err = await sh("sh", "-c", "base64 -d | openssl pkcs7 -inform DER -print_certs", stdin=body)
        assert rc == 0, err
        ca = x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN"):])
        assert ca.public_bytes(serialization.Encoding.DER) == relay.ca.cert_der
        assert (await curl(relay, EST + "/csrattrs"))[0] == 204
        assert (await curl(relay, EST + "/serverkeygen", "-X", "POST"))[0] == 404

        async with echo_service() as svc:
            by = await start_agent(tmp_path, "by", join_token(relay), {"echo": ("127.0.0.1", svc)})
            keep = asyncio.ensure_future(bystander(relay.tcp_ports["echo"], 6))
            # -- enroll: Basic, Bearer, and the OTP as typed by people (lower case, hyphens)
            b64 = await openssl_csr(tmp_path, "one")
            ct = ["-H", "Content-Type: application/pkcs10"]
            status, h, body = await curl(relay, EST + "/simpleenroll", "-u", f"cam:{otp_basic}", *ct,
                                         "--data-binary", f"@{b64}")
            assert status == 200, body
            assert h["content-type"] == "application/pkcs7-mime; smime-type=certs-only"
            dev = device_of(issued(body))
            assert relay.store.query("SELECT name, labels FROM dc_devices WHERE id = ?", (dev,)) == [
                ("cam-01", '{"site":"a"}')]
            assert relay.store.get_agent(dev)["revoked_at"] is None
            status, _, body = await curl(relay, EST + "/simpleenroll", "-H", f"Authorization: Bearer {otp_bearer}",
                                         *ct, "--data-binary", f"@{b64}")
            assert status == 200, body
            # the OTP in the CSR's challengePassword (openssl req), no Authorization header
            otp_challenge = (await new_otp(relay, key))["otp"]
            (tmp_path / "req.cnf").write_text("[req]\nprompt = no\ndistinguished_name = dn\nattributes = attrs\n"
                                              f"[dn]\nCN = chal\n[attrs]\nchallengePassword = {otp_challenge}\n")
            chal = str(tmp_path / "chal.der")
            assert (await sh("openssl", "req", "-new", "-key", str(tmp_path / "one.key"), "-config",
                             str(tmp_path / "req.cnf"), "-outform", "DER", "-out", chal))[0] == 0
            assert (await sh("openssl", "base64", "-in", chal, "-out", chal + ".b64"))[0] == 0
            status, _, body = await curl(relay, EST + "/simpleenroll", *ct, "--data-binary", f"@{chal}.b64")
            assert status == 200, body
            device_of(issued(body))
            spaced = "-".join(otp_lower[i:i + 4] for i in range(0, 26, 4)).lower()
            status, _, body = await curl(relay, EST + "/simpleenroll", "-u", f"x:{spaced}", *ct,
                                         "--data-binary", f"@{b64}")
            assert status == 200, body

            # -- refused OTPs: used, expired, revoked, wrong, missing: one answer
            otps = Otps(relay.store)
            _, expired = otps.create(ttl=10, now=time.time() - 60)
            rev, revoked = otps.create()
            assert (await https(relay, "DELETE", f"{OTPS}/{rev['otp_id']}", b"",
                                {"Authorization": f"Bearer {key}"}))[0] == 204
            wrong = "0" * 26
            answers = []
            for otp in (otp_basic, expired, revoked, wrong, None):
                auth = ["-u", f"cam:{otp}"] if otp else []
                status, h, body = await curl(relay, EST + "/simpleenroll", *auth, *ct, "--data-binary", f"@{b64}")
                answers.append((status, h.get("www-authenticate"), body))
            assert answers[0][0] == 401 and answers[0][1] == 'Basic realm="relayd-est"'
            assert all(a == answers[0] for a in answers), answers
            assert bad_input("est", "bad_otp") >= 4 and bad_input("est", "no_otp") >= 1

            # -- hostile bodies
            der, _ = csr_der(tmp_path)
            good = await new_otp(relay, key)
            auth = ["-u", f"cam:{good['otp']}"]
            bad_sig = bytearray(der)
            bad_sig[-3] ^= 0x55
            hostile = [
                (400, "bad_base64", ct, b"\x00\xff garbage \x01"),
                (400, "bad_csr", ct, base64.b64encode(os.urandom(300))),
                (400, "bad_signature", ct, base64.b64encode(bytes(bad_sig))),
                (415, "media_type", ["-H", "Content-Type: application/json"], base64.b64encode(der)),
                (413, "too_large", ct, b"A" * (17 * 1024)),
                (400, "empty", ct, b""),
            ]
            for status_want, reason, hdrs, payload in hostile:
                before = bad_input("est", reason)
                (tmp_path / "body").write_bytes(payload)
                status, _, body = await curl(relay, EST + "/simpleenroll", *auth, *hdrs,
                                             "--data-binary", f"@{tmp_path / 'body'}")
                assert status == status_want, (reason, body)
                assert bad_input("est", reason) == before + 1, reason
            # the OTP survived every refusal; a PEM CSR with a challengePassword... see strongSwan
            status, _, body = await curl(relay, EST + "/simpleenroll", *auth, *ct, "--data-binary",
                                         base64.b64encode(der).decode())
            assert status == 200, body
            assert await keep, "the bystander stream was disturbed"
            assert await echo_ok(relay.tcp_ports["echo"])
            await by.stop()
        for otp in (otp_basic, otp_bearer, otp_challenge, expired, revoked, good["otp"], key):
            assert otp not in caplog.text
        assert "garbage" not in caplog.text
        refused = [r for r in caplog.records if r.getMessage().startswith("est request refused")]
        assert {r.reason for r in refused} >= {"bad_otp", "no_otp", "bad_signature", "media_type", "too_large"}
        assert value("relayd_est_requests_total", op="simpleenroll", status="200") >= 4
        await relay.stop()

    run(main())


@pytest.mark.skipif(not shutil.which("pki"), reason="strongSwan pki (scripts/test.sh installs strongswan-pki)")
def test_strongswan_pki_estca_est_and_reenroll(tmp_path):
    async def main():
        relay = await relay_with_https(tmp_path)
        key = admin_key(tmp_path)
        url = f"https://127.0.0.1:{relay.https_port}"
        tls_ca = str(relay.ca_path)
        async with echo_service() as svc:
            by = await start_agent(tmp_path, "by", join_token(relay), {"echo": ("127.0.0.1", svc)})
            done = asyncio.Event()
            keep = asyncio.ensure_future(bystander(relay.tcp_ports["echo"], 0, done))
            try:
                await pki_flow(relay, key, url, tls_ca)
            finally:
                done.set()
            assert await keep, "the bystander stream was disturbed"
            await by.stop()
        await relay.stop()

    async def pki_flow(relay, key, url, tls_ca):
        rc, out, err = await sh("pki", "--estca", "--url", url, "--cacert", tls_ca, "--caout", str(tmp_path / "ca"),
                                "--outform", "pem")
        assert rc == 0, (out, err)
        got = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ca"))
        assert got, out
        assert x509.load_pem_x509_certificate((tmp_path / got[0]).read_bytes()).public_bytes(
            serialization.Encoding.DER) == relay.ca.cert_der
        # enroll with the OTP as Basic password (--userpass), an ECDSA key made by pki
        k, req = await pki_request(tmp_path, "cam-pki")
        otp = (await new_otp(relay, key, device_name="pki-cam"))["otp"]
        rc, out, err = await pki_est(url, tls_ca, req, "--userpass", f"cam:{otp}")
        assert rc == 0, (out, err)
        cert = x509.load_pem_x509_certificate(out)
        dev = device_of(cert)
        assert relay.store.query("SELECT name FROM dc_devices WHERE id = ?", (dev,)) == [("pki-cam",)]
        # the same OTP again: refused
        rc, _, _ = await pki_est(url, tls_ca, req, "--userpass", f"cam:{otp}")
        assert rc != 0
        # the OTP in the CSR's challengePassword (pki --req --password), an RSA key
        rc, rsakey, err = await sh("pki", "--gen", "--type", "rsa", "--size", "2048", "--outform", "der", timeout=60)
        (tmp_path / "rsa.der").write_bytes(rsakey)
        otp2 = (await new_otp(relay, key))["otp"]
        rc, req2, err = await sh("pki", "--req", "--in", str(tmp_path / "rsa.der"), "--type", "rsa", "--dn",
                                 "CN=cam-rsa", "--password", otp2, "--outform", "der")
        assert rc == 0, err
        (tmp_path / "req2.der").write_bytes(req2)
        rc, out2, err = await pki_est(url, tls_ca, str(tmp_path / "req2.der"))
        assert rc == 0, (out2, err)
        device_of(x509.load_pem_x509_certificate(out2))
        # re-enroll by the current certificate (TLS client auth, no Authorization)
        (tmp_path / "dev.pem").write_bytes(out)
        rc, out3, err = await pki_est(url, tls_ca, req, "--cert", str(tmp_path / "dev.pem"), "--key", k)
        assert rc == 0, (out3, err)
        renewed = x509.load_pem_x509_certificate(out3)
        assert device_of(renewed) == dev and renewed.serial_number != cert.serial_number
        assert relay.store.get_agent(dev)["cert_serial"] == renewed.serial_number
        # a revoked device cannot re-enroll
        relay.store.revoke_agent(dev)
        before = bad_input("est", "revoked")
        rc, _, _ = await pki_est(url, tls_ca, req, "--cert", str(tmp_path / "dev.pem"), "--key", k)
        assert rc != 0 and bad_input("est", "revoked") == before + 1

    run(main())


def test_relayd_agent_enrolls_over_est_carries_traffic_and_renews(tmp_path):
    """A real `relayd agent --otp --est --pin` process."""
    async def main():
        relay = await start_relay(tmp_path, endpoints=("echo", "by"), https=("127.0.0.1", 0), agent_cert_ttl=9.0)
        key = admin_key(tmp_path)
        otp = await new_otp(relay, key, device_name="edge-1")
        env = {**os.environ, "PYTHONPATH": ROOT}
        async with echo_service() as svc:
            by = await start_agent(tmp_path, "by", join_token(relay), {"by": ("127.0.0.1", svc)})
            keep = asyncio.ensure_future(bystander(relay.tcp_ports["by"], 4))
            # a wrong pin: refused before the OTP is sent
            rc, _, err = await sh(sys.executable, "-m", "relayd.cli", "agent", "--data", str(tmp_path / "bad"),
                                  "--otp", otp["otp"], "--est", otp["est_url"], "--pin", "ab" * 32,
                                  "--endpoint", f"echo=127.0.0.1:{svc}", env=env, timeout=30)
            assert rc != 0 and b"pin mismatch" in err, err
            assert Otps(relay.store).get(otp["otp_id"])["state"] == "pending"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relayd.cli", "agent", "--data", str(tmp_path / "dev"), "--otp", otp["otp"],
                "--est", f"https://127.0.0.1:{relay.https_port}", "--pin", otp["ca_sha256"],
                "--endpoint", f"echo=127.0.0.1:{svc}", env=env, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            try:
                await until(lambda: Otps(relay.store).get(otp["otp_id"])["state"] == "used", 20, "no enrollment")
                dev = Otps(relay.store).get(otp["otp_id"])["device_id"]
                assert relay.store.query("SELECT name FROM dc_devices WHERE id = ?", (dev,)) == [("edge-1",)]
                # the relay marks the OTP used before the agent has read the answer and written its files
                await until((tmp_path / "dev" / "agent.key").exists, 20, "the agent kept no key")
                assert (tmp_path / "dev" / "agent.key").stat().st_mode & 0o077 == 0
                await until(lambda: dev in relay.sessions, 20, "the device's tunnel did not come up")
                for _ in range(3):
                    assert await echo_ok(relay.tcp_ports["echo"], 300_000)
                first = relay.store.get_agent(dev)["cert_serial"]
                # renewal by simplereenroll at two thirds of the 9 s life
                await until(lambda: relay.store.get_agent(dev)["cert_serial"] != first, 20, "no renewal")
                assert value("relayd_est_requests_total", op="simplereenroll", status="200") >= 1
                assert await echo_ok(relay.tcp_ports["echo"], 100_000)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
            assert await keep
            await by.stop()
        await relay.stop()

    run(main())
