"""The relay's private certificate authority.

Theory of operation
-------------------
Each relay owns one CA (ECDSA P-256, SHA-256 signatures) kept in its data
directory as ``ca.key`` (PKCS#8 PEM, mode 0600) and ``ca.crt``. It signs:

* the relay's own TLS server certificate (``issue_server_cert``), so agents
  can trust the relay knowing nothing but the CA pin carried in their join
  token (``pin`` = SHA-256 of the CA certificate's DER, kubeadm style);
* one client certificate per enrolled agent (``sign_agent_csr``). The agent
  generates its key locally and sends only a CSR, so the private key never
  leaves the agent. Everything that carries identity in the issued
  certificate (CN, the ``relayd:agent:<id>`` SAN URI, EKU, validity) comes
  from the relay, never from the CSR, whose subject and extensions are
  ignored: the CSR only proves possession of a key.

The CA is pathlen 0: it signs leaves only, so a leaked agent key can never
mint further certificates. Issued certificates satisfy OpenSSL's
X509_V_FLAG_X509_STRICT (key identifiers, critical basic constraints), which
Python 3.13 turns on by default.

Private keys are written so that they are never readable by anyone else, not
even for an instant: a temporary file is created with O_EXCL and mode 0600,
fsynced, then moved into place.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import pathlib
import re
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from relayd.errors import AuthError, ConfigError

#: What cryptography raises for bytes that are not a certificate it can read
#: (InvalidVersion, for a version it does not know, is none of the others).
UNREADABLE = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion)

__all__ = [
    "AGENT_URI_PREFIX",
    "CertificateAuthority",
    "cert_info",
    "generate_key_and_csr",
    "pin_of",
    "write_private",
]

#: SAN URI prefix that names an agent in its client certificate.
AGENT_URI_PREFIX = "relayd:agent:"
#: SAN URI prefix that names a device (an agent enrolled over EST).
DEVICE_URI_PREFIX = "urn:relayd:device:"
DEVICE_KEYS = "ECDSA P-256 or P-384, Ed25519, or RSA 2048-4096"

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
CA_DAYS = 3650
#: Certificates start a little in the past so that a peer whose clock lags
#: ours by a few minutes does not reject a certificate issued just now.
BACKDATE = datetime.timedelta(minutes=5)

# Agent ids end up in a CN and a URI; keep them to a plain, unambiguous set.
_AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_DNS_RE = re.compile(r"(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\Z")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _random_serial() -> int:
    # 128 random bits (RFC 5280 allows up to 20 octets, positive): serials
    # nobody can predict, so a chosen-prefix collision cannot be prepared.
    return secrets.randbits(128) | 1


def pin_of(cert_der: bytes) -> str:
    """The pin of a certificate: ``sha256:`` + hex SHA-256 of its DER."""
    return "sha256:" + hashlib.sha256(cert_der).hexdigest()


def _fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: pathlib.Path, data: bytes, mode: int) -> pathlib.Path:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write through a file (or symlink) someone planted; the
    # mode is set at creation, so the bytes are never readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_private(path: os.PathLike | str, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600, replacing it."""
    path = pathlib.Path(path)
    tmp = _write_temp(path, data, 0o600)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_new(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Atomically create ``path``; FileExistsError if it already exists.

    A hard link, unlike rename, refuses to replace an existing file, so two
    processes creating the CA at once cannot overwrite each other's key.
    """
    tmp = _write_temp(path, data, mode)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def read_private_key(path: os.PathLike | str):
    """The unencrypted PEM private key in ``path``, a file only its owner
    may read (the CA's key, the ACME account key). FileNotFoundError if there
    is none; ConfigError naming the file otherwise, never quoting it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        # Check the mode of the file actually opened (no race with chmod
        # or a swapped file between check and read).
        mode = os.fstat(fd).st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{path} is accessible by group or others (mode {mode & 0o777:03o});"
                " run: chmod 600 " + str(path)
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    finally:
        os.close(fd)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # Never echo the file's content: it is (or was meant to be) a key.
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None


def generate_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new P-256 key and a CSR for it: ``(key_pem, csr_pem)``."""
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def _load_cert(data: bytes) -> x509.Certificate:
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except UNREADABLE:
        raise AuthError("malformed certificate") from None


def cert_info(cert_pem_or_der: bytes) -> dict:
    """Identity and validity of a certificate (the first one of a PEM chain).

    Keys: serial, serial_hex, common_name, not_before, not_after (aware UTC
    datetimes) and agent_id (from a ``relayd:agent:`` SAN URI, else None).
    Raises AuthError if the bytes are not a certificate.
    """
    cert = _load_cert(cert_pem_or_der)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    agent_id = None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(AGENT_URI_PREFIX):
                agent_id = uri[len(AGENT_URI_PREFIX) :]
                break
    return {
        "serial": cert.serial_number,
        "serial_hex": f"{cert.serial_number:x}",
        "common_name": str(cns[0].value) if cns else None,
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "agent_id": agent_id,
    }


def _san_entry(name: str) -> x509.GeneralName:
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _DNS_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid server hostname {name[:80]!r}")
    return x509.DNSName(name)


class CertificateAuthority:
    """The relay's CA: a P-256 key and a self-signed pathlen-0 certificate."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        directory: pathlib.Path | None = None,
    ) -> None:
        self._key = key
        self._cert = cert
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        self.directory = directory

    # -- loading ----------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, directory: pathlib.Path, *, name: str = "relayd CA"
    ) -> CertificateAuthority:
        """Load the CA from ``directory``, creating it on first use."""
        directory = pathlib.Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path = directory / KEY_FILE
        cert_path = directory / CERT_FILE

        try:
            key = cls._read_key(key_path)
        except FileNotFoundError:
            if cert_path.exists():
                # A certificate without its key cannot sign; regenerating the
                # key would silently change the pin every agent trusts.
                raise ConfigError(f"{cert_path} exists but {key_path} is missing") from None
            key = _new_key()
            try:
                _write_new(key_path, _key_pem(key), 0o600)
            except FileExistsError:
                key = cls._read_key(key_path)  # another process won the race

        try:
            cert_pem = cert_path.read_bytes()
        except FileNotFoundError:
            # First start, or a crash between writing the key and the
            # certificate: nobody can have pinned a certificate never written.
            cert_pem = cls._self_sign(key, name).public_bytes(serialization.Encoding.PEM)
            try:
                _write_new(cert_path, cert_pem, 0o644)
            except FileExistsError:
                cert_pem = cert_path.read_bytes()

        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ConfigError(f"{cert_path} is not a PEM certificate") from None
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise ConfigError(f"{cert_path} does not match the private key {key_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ConfigError(f"{cert_path} is not a CA certificate")
        return cls(key, cert, directory)

    @staticmethod
    def _read_key(path: pathlib.Path) -> ec.EllipticCurvePrivateKey:
        key = read_private_key(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError(f"{path} is not an ECDSA P-256 key")
        return key

    @staticmethod
    def _self_sign(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )

    # -- properties -------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._cert

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        """The CA certificate, DER."""
        return self._cert_der

    @property
    def pin(self) -> str:
        """``sha256:<hex>`` of the CA certificate's DER, as join tokens carry it."""
        return pin_of(self._cert_der)

    @property
    def cert_path(self) -> pathlib.Path | None:
        """Path of ``ca.crt`` (None for a CA not loaded from a directory)."""
        return None if self.directory is None else self.directory / CERT_FILE

    # -- issuing ----------------------------------------------------------

    def _leaf(self, subject: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
        if not days > 0:
            raise ConfigError(f"certificate validity must be positive, got {days!r} days")
        now = _now()
        ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def issue_server_cert(self, hostnames: list[str], *, days: int = 397) -> tuple[bytes, bytes]:
        """A TLS server certificate for ``hostnames`` (DNS names or IPs).

        Returns ``(chain_pem, key_pem)``; the chain is leaf then CA. 397 days
        is the longest validity browsers accept.
        """
        if not hostnames:
            raise ConfigError("a server certificate needs at least one hostname")
        sans = [_san_entry(h) for h in hostnames]
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0][:64])])
        cert = (
            self._leaf(subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem, _key_pem(key)

    def sign_agent_csr(self, csr_pem: bytes, agent_id: str, *, days: float, device: bool = False) -> bytes:
        """Sign an agent's CSR as a client certificate for ``agent_id`` (PEM).

        Only the CSR's public key is used, after checking the CSR's signature
        (proof of possession); its subject and extensions are ignored. A
        ``device`` (enrolled over EST, relayd.control.est) also gets the SAN
        URI ``urn:relayd:device:<id>`` and may bring the keys devices' own
        tools make: ECDSA P-256 or P-384, Ed25519, RSA 2048-4096.
        """
        if not isinstance(agent_id, str) or not _AGENT_ID_RE.match(agent_id):
            raise ConfigError("invalid agent id")
        public_key = _csr_key(csr_pem)
        if not key_allowed(public_key, device):
            raise AuthError("certificate request key must be " + (DEVICE_KEYS if device else "ECDSA P-256 or Ed25519"))
        uris = [x509.UniformResourceIdentifier(AGENT_URI_PREFIX + agent_id)]
        if device:
            uris.append(x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + agent_id))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)])
        cert = (
            self._leaf(subject, public_key, days)
            .add_extension(x509.SubjectAlternativeName(uris), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def sign_user_csr(self, csr_pem: bytes, provider: str, username: str, device_id: str, sid: str,
                      not_after: float) -> bytes:
        """A zero-trust user's session certificate (PEM) from the user CA
        (``../shared/specs/zero-trust.md`` 4.1): subject
        ``[OU=provider, CN=username, CN=device]`` written by the CA (the
        CSR's is ignored), P-256 keys only, valid from 60 s ago until
        ``not_after``, clientAuth only, SAN ``urn:relayd:session:<sid>``."""
        public_key = _csr_key(csr_pem)
        if not (isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1)):
            raise AuthError("certificate request key must be ECDSA P-256")
        now = _now()
        end = datetime.datetime.fromtimestamp(not_after, datetime.timezone.utc)
        ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(user_subject(provider, username, device_id))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(_random_serial())
            .not_valid_before(now - datetime.timedelta(seconds=60))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                "urn:relayd:session:" + sid)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed ``cert`` (issuer name and signature)."""
        try:
            cert.verify_directly_issued_by(self._cert)
            return True
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False


def key_allowed(public_key, device: bool = False) -> bool:
    """Whether a CSR's key may get a client certificate: P-256 or Ed25519;
    for a device also P-384 and RSA of 2048 to 4096 bits."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return True
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return isinstance(public_key.curve, ec.SECP256R1) or (device and isinstance(public_key.curve, ec.SECP384R1))
    return device and isinstance(public_key, rsa.RSAPublicKey) and 2048 <= public_key.key_size <= 4096


def _csr_key(csr_pem: bytes):
    """The public key of a CSR whose signature (proof of possession)
    verifies; its subject and extensions are never used."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise AuthError("malformed certificate request") from None
    if not valid:
        raise AuthError("certificate request signature is invalid")
    return public_key


def user_subject(provider: str, username: str, device_id: str) -> x509.Name:
    """A session certificate's subject as a DER sequence ``[OU, CN, CN]``:
    printed RFC 4514 style (last first) it reads
    ``CN=<device>,CN=<username>,OU=<provider>``, Appgate's DN."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, provider),
                      x509.NameAttribute(NameOID.COMMON_NAME, username),
                      x509.NameAttribute(NameOID.COMMON_NAME, device_id)])


def subject_triple(cert: x509.Certificate) -> tuple[str, str, str] | None:
    """(provider, username, device id) of a session certificate, compared
    as typed values, never by splitting strings; None if its subject is not
    exactly ``[OU, CN, CN]`` with one value each."""
    rdns = list(cert.subject.rdns)
    if len(rdns) != 3 or any(len(r) != 1 for r in rdns):
        return None
    attrs = [next(iter(r)) for r in rdns]
    if [a.oid for a in attrs] != [NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME, NameOID.COMMON_NAME]:
        return None
    if not all(isinstance(a.value, str) for a in attrs):
        return None
    return attrs[0].value, attrs[1].value, attrs[2].value
