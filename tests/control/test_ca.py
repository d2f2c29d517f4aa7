"""The CA: files on disk, server certificates and agent certificates, checked
by real TLS handshakes (OpenSSL via ``ssl``), not only by parsing."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relayd.control.ca import (
    CertificateAuthority,
    cert_info,
    generate_key_and_csr,
    pin_of,
    write_private,
)
from relayd.errors import AuthError, ConfigError


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


# -- files ------------------------------------------------------------------


def test_create_then_load(tmp_path):
    d = tmp_path / "data" / "ca"
    ca1 = CertificateAuthority.load_or_create(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "ca.key").st_mode) == 0o600
    assert (d / "ca.crt").read_bytes() == ca1.cert_pem
    ca2 = CertificateAuthority.load_or_create(d)
    assert ca2.cert_der == ca1.cert_der
    assert ca2.pin == ca1.pin == pin_of(ca1.cert_der)
    assert ca1.pin.startswith("sha256:") and len(ca1.pin) == 7 + 64
    assert ca1.pin == ca1.pin.lower()
    assert not list(d.glob(".*tmp"))


def test_ca_certificate_shape(ca):
    cert = ca.certificate
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=3600) < life < datetime.timedelta(days=3700)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "relayd CA"
    key = serialization.load_pem_private_key((ca.directory / "ca.key").read_bytes(), None)
    assert b"BEGIN PRIVATE KEY" in (ca.directory / "ca.key").read_bytes()  # PKCS#8
    assert isinstance(key.curve, ec.SECP256R1)


def test_two_cas_differ(tmp_path):
    a = CertificateAuthority.load_or_create(tmp_path / "a")
    b = CertificateAuthority.load_or_create(tmp_path / "b")
    assert a.pin != b.pin
    assert a.certificate.serial_number != b.certificate.serial_number


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_readable_key(tmp_path, mode):
    d = tmp_path / "ca"
    CertificateAuthority.load_or_create(d)
    os.chmod(d / "ca.key", mode)
    with pytest.raises(ConfigError, match="group or others"):
        CertificateAuthority.load_or_create(d)


def test_refuses_mismatched_pair(tmp_path):
    CertificateAuthority.load_or_create(tmp_path / "a")
    CertificateAuthority.load_or_create(tmp_path / "b")
    os.replace(tmp_path / "b" / "ca.crt", tmp_path / "a" / "ca.crt")
    with pytest.raises(ConfigError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_refuses_garbage_key_without_echoing_it(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority.load_or_create(d)
    write_private(d / "ca.key", b"SECRET-MATERIAL")
    with pytest.raises(ConfigError) as info:
        CertificateAuthority.load_or_create(d)
    assert "SECRET" not in str(info.value)


def test_refuses_cert_without_key(tmp_path):
    d = tmp_path / "ca"
    CertificateAuthority.load_or_create(d)
    (d / "ca.key").unlink()
    with pytest.raises(ConfigError, match="missing"):
        CertificateAuthority.load_or_create(d)


def test_recreates_cert_lost_before_first_write(tmp_path):
    # A crash between writing ca.key and ca.crt leaves only the key.
    d = tmp_path / "ca"
    ca1 = CertificateAuthority.load_or_create(d)
    (d / "ca.crt").unlink()
    ca2 = CertificateAuthority.load_or_create(d)
    assert ca2.certificate.public_key() == ca1.certificate.public_key()


def test_write_private(tmp_path):
    p = tmp_path / "k.pem"
    p.write_bytes(b"old")
    os.chmod(p, 0o644)
    write_private(p, b"new")
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert [x.name for x in tmp_path.iterdir()] == ["k.pem"]


# -- TLS helpers ------------------------------------------------------------


def _files(tmp_path, name, chain_pem, key_pem):
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.write_bytes(chain_pem)
    write_private(key, key_pem)
    return str(cert), str(key)


def server_context(tmp_path, chain_pem, key_pem, client_ca_pem=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(*_files(tmp_path, "server", chain_pem, key_pem))
    if client_ca_pem is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cadata=client_ca_pem.decode())
    return ctx


def client_context(tmp_path, cafile, cert=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=str(cafile))
    if cert is not None:
        ctx.load_cert_chain(*_files(tmp_path, "client", *cert))
    return ctx


def handshake(server_ctx, client_ctx, server_hostname):
    """One TLS connection over 127.0.0.1; returns (server outcome, client outcome).

    An outcome is the peer certificate dict on success, or the exception.
    The client reads one byte after its handshake because under TLS 1.3 it
    learns that the server refused its certificate only then.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    result = {}

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["server"] = tls.getpeercert()
                tls.sendall(b"!")
        except Exception as exc:
            result["server"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                peer = tls.getpeercert()
                if tls.recv(1) != b"!":
                    raise ConnectionError("no data after handshake")
                client = peer
    except Exception as exc:
        client = exc
    t.join(10)
    listener.close()
    return result["server"], client


# -- server certificates ----------------------------------------------------


@pytest.fixture
def server_chain(ca):
    return ca.issue_server_cert(["localhost", "127.0.0.1", "::1", "relay.example.com"])


def test_server_cert_shape(ca, server_chain):
    chain_pem, key_pem = server_chain
    certs = x509.load_pem_x509_certificates(chain_pem)
    assert len(certs) == 2 and certs[1] == ca.certificate
    leaf = certs[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "relay.example.com"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = leaf.not_valid_after_utc - utcnow()
    assert datetime.timedelta(days=396) < life <= datetime.timedelta(days=397)
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == leaf.public_key()
    ca.certificate.public_key().verify(
        leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256())
    )


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
def test_server_cert_tls_handshake(tmp_path, ca, server_chain, hostname):
    server, client = handshake(
        server_context(tmp_path, *server_chain),
        client_context(tmp_path, ca.cert_path),
        hostname,
    )
    assert isinstance(client, dict), client
    assert server is None  # no client certificate requested


def test_server_cert_wrong_hostname_refused(tmp_path, ca, server_chain):
    _, client = handshake(
        server_context(tmp_path, *server_chain),
        client_context(tmp_path, ca.cert_path),
        "other.example.com",
    )
    assert isinstance(client, ssl.SSLCertVerificationError)


def test_server_cert_from_other_ca_refused(tmp_path, ca):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    _, client = handshake(
        server_context(tmp_path, *other.issue_server_cert(["localhost"])),
        client_context(tmp_path, ca.cert_path),
        "localhost",
    )
    assert isinstance(client, ssl.SSLCertVerificationError)


@pytest.mark.parametrize("bad", [[], ["bad host!"], ["a..b"], [""]])
def test_server_cert_bad_hostnames(ca, bad):
    with pytest.raises(ConfigError):
        ca.issue_server_cert(bad)


# -- agent certificates -----------------------------------------------------


def test_generate_key_and_csr():
    key_pem, csr_pem = generate_key_and_csr("agent-x")
    key = serialization.load_pem_private_key(key_pem, None)
    assert b"BEGIN PRIVATE KEY" in key_pem
    assert isinstance(key.curve, ec.SECP256R1)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()


def test_sign_agent_csr(ca):
    _, csr_pem = generate_key_and_csr("whatever-the-agent-claims")
    before = utcnow()
    cert_pem = ca.sign_agent_csr(csr_pem, "ag-123", days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ag-123"
    assert cert.issuer == ca.certificate.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["relayd:agent:ag-123"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    skew = before - cert.not_valid_before_utc
    assert datetime.timedelta(minutes=4) < skew <= datetime.timedelta(minutes=5, seconds=2)
    life = cert.not_valid_after_utc - before
    assert datetime.timedelta(days=30) - datetime.timedelta(seconds=2) < life
    assert life <= datetime.timedelta(days=30, seconds=2)
    assert 0 < cert.serial_number < 2**128

    info = cert_info(cert_pem)
    assert info["agent_id"] == "ag-123" and info["common_name"] == "ag-123"
    assert info["serial"] == cert.serial_number
    assert info["serial_hex"] == format(cert.serial_number, "x")
    assert info["not_after"] == cert.not_valid_after_utc
    assert info["not_before"].tzinfo is not None
    assert cert_info(cert.public_bytes(serialization.Encoding.DER)) == info


def test_serials_are_random(ca):
    _, csr_pem = generate_key_and_csr("a")
    serials = {cert_info(ca.sign_agent_csr(csr_pem, "a1", days=1))["serial"] for _ in range(5)}
    assert len(serials) == 5


def test_csr_extensions_and_subject_ignored(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("relayd:agent:admin")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert = x509.load_pem_x509_certificate(
        ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), "ag-1", days=1)
    )
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert_info(cert.public_bytes(serialization.Encoding.PEM))["agent_id"] == "ag-1"


def test_ed25519_csr_accepted(ca):
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, None)
    )
    cert_pem = ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), "ed", days=1)
    assert cert_info(cert_pem)["agent_id"] == "ed"


def test_tampered_csr_refused(ca):
    _, csr_pem = generate_key_and_csr("agent")
    csr = x509.load_pem_x509_csr(csr_pem)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # Flip a bit inside the subject's CN ("agent"), leaving the DER valid.
    i = bytes(der).index(b"agent")
    der[i] ^= 0x01
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(AuthError, match="signature is invalid"):
        ca.sign_agent_csr(tampered, "a", days=1)


def test_rsa_csr_refused(ca):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthError, match="P-256 or Ed25519"):
        ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), "a", days=1)


def test_other_curve_csr_refused(ca):
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(AuthError):
        ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), "a", days=1)


@pytest.mark.parametrize("junk", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"])
def test_malformed_csr_refused(ca, junk):
    with pytest.raises(AuthError):
        ca.sign_agent_csr(junk, "a", days=1)


@pytest.mark.parametrize("agent_id", ["", "a b", "a/b", "x" * 200, "../x"])
def test_bad_agent_id(ca, agent_id):
    _, csr_pem = generate_key_and_csr("a")
    with pytest.raises(ConfigError):
        ca.sign_agent_csr(csr_pem, agent_id, days=1)


def test_cert_info_malformed():
    with pytest.raises(AuthError):
        cert_info(b"nope")


def test_cert_info_without_agent_uri(ca, server_chain):
    info = cert_info(server_chain[0])
    assert info["agent_id"] is None and info["common_name"] == "localhost"


# -- mutual TLS -------------------------------------------------------------


def _agent_cert(ca, agent_id="ag-7"):
    key_pem, csr_pem = generate_key_and_csr("ignored")
    return ca.sign_agent_csr(csr_pem, agent_id, days=1), key_pem


def test_mtls_with_agent_cert(tmp_path, ca, server_chain):
    server, client = handshake(
        server_context(tmp_path, *server_chain, client_ca_pem=ca.cert_pem),
        client_context(tmp_path, ca.cert_path, cert=_agent_cert(ca)),
        "localhost",
    )
    assert isinstance(client, dict), client
    assert isinstance(server, dict), server
    assert ("URI", "relayd:agent:ag-7") in server["subjectAltName"]


def test_mtls_cert_from_other_ca_refused(tmp_path, ca, server_chain):
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    server, client = handshake(
        server_context(tmp_path, *server_chain, client_ca_pem=ca.cert_pem),
        client_context(tmp_path, ca.cert_path, cert=_agent_cert(other)),
        "localhost",
    )
    assert isinstance(server, ssl.SSLError), server
    assert isinstance(client, (ssl.SSLError, OSError)), client


def test_mtls_without_client_cert_refused(tmp_path, ca, server_chain):
    server, client = handshake(
        server_context(tmp_path, *server_chain, client_ca_pem=ca.cert_pem),
        client_context(tmp_path, ca.cert_path),
        "localhost",
    )
    assert isinstance(server, ssl.SSLError), server
    assert isinstance(client, (ssl.SSLError, OSError)), client


def test_server_cert_cannot_act_as_client(tmp_path, ca, server_chain):
    # EKU serverAuth only: a leaked relay key cannot impersonate an agent.
    leaf_pem = x509.load_pem_x509_certificates(server_chain[0])[0].public_bytes(
        serialization.Encoding.PEM
    )
    server, _ = handshake(
        server_context(tmp_path, *server_chain, client_ca_pem=ca.cert_pem),
        client_context(tmp_path, ca.cert_path, cert=(leaf_pem, server_chain[1])),
        "localhost",
    )
    assert isinstance(server, ssl.SSLError), server


def version_4(cert: x509.Certificate) -> bytes:
    """``cert`` with its version field set to 4 (the signature no longer
    matches, but readers refuse the version first)."""
    der = cert.public_bytes(serialization.Encoding.DER)
    v3 = b"\xa0\x03\x02\x01\x02"
    assert der.count(v3) >= 1
    return der.replace(v3, b"\xa0\x03\x02\x01\x03", 1)


def test_an_unknown_certificate_version_is_unreadable_not_a_crash(ca):
    from relayd.control.ca import UNREADABLE, _load_cert

    bad = version_4(x509.load_pem_x509_certificate(ca.cert_pem))
    with pytest.raises(x509.InvalidVersion):  # not a ValueError: why UNREADABLE lists it
        x509.load_der_x509_certificate(bad)
    pem = b"-----BEGIN CERTIFICATE-----\n" + __import__("base64").encodebytes(bad) + b"-----END CERTIFICATE-----\n"
    for data in (bad, pem):
        with pytest.raises(AuthError):
            _load_cert(data)
        with pytest.raises(UNREADABLE):
            x509.load_pem_x509_certificate(pem)
