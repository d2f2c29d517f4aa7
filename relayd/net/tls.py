"""TLS contexts: 1.2 minimum, 1.3 preferred, no renegotiation, no compression."""

from __future__ import annotations

import ssl


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options |= getattr(ssl, "OP_CIPHER_SERVER_PREFERENCE", 0)
    # TLS 1.2 suites: forward-secret AEAD only.
    ctx.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    return ctx


def server_context(cert_file: str, key_file: str, *, client_ca: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """Server side. With ``client_ca``, a client certificate is checked
    against it (required, or optional so that enrollment can happen on the
    same port: a certificate that is presented must still verify)."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: str, *, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """Client side verifying the server against ``ca_file`` only."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.load_verify_locations(ca_file)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


#: The ALPN protocol relayd's own clients (agents over WSS, zero-trust and
#: EST clients) offer on the HTTPS port: it gets them the relay's own
#: certificate, which they verify against its CA, where a public one (ACME,
#: serve.certs) serves the same name to everyone else (relayd.core.tlshello).
RELAY_ALPN = "relayd"


def relay_client_context(ca_file: str, *, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """``client_context`` for dialling the relay itself: offers RELAY_ALPN
    (and http/1.1, for a TLS-terminating proxy in between)."""
    ctx = client_context(ca_file, cert_file=cert_file, key_file=key_file)
    ctx.set_alpn_protocols([RELAY_ALPN, "http/1.1"])
    return ctx


def unverified_client_context() -> ssl.SSLContext:
    """Only for fetching a CA certificate whose pin the caller then checks
    (join-token bootstrap); nothing secret is sent over it."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class CertSelector:
    """Several certificates on one listener, chosen by SNI, reloadable.

    The listener keeps one default context; its ``sni_callback`` switches the
    handshake to the context whose certificate names the requested host
    (exact names first, then one-label wildcards). ``reload()`` re-reads the
    PEM files and swaps the table: handshakes from then on use the new
    certificates, established connections keep theirs. A file that fails to
    load keeps the previous table and raises, so a bad edit never takes the
    listener down.
    """

    def __init__(self, default: ssl.SSLContext, pairs: list[tuple[str, str]], client_ca: str | None,
                 make=None) -> None:
        self.default = default
        self.pairs = list(pairs)
        self.client_ca = client_ca
        # The contexts a handshake switches to verify client certificates
        # with their own trust store, so they must trust what the default does.
        self.make = make or (lambda cert, key: server_context(cert, key, client_ca=client_ca))
        self.by_name: dict[str, ssl.SSLContext] = {}
        #: Certificates the relay looks after itself (relayd.gateway.certs:
        #: ACME, its CA's per-host ones), exact names; the files above win.
        self.managed: dict[str, ssl.SSLContext] = {}
        self.reload()
        default.sni_callback = self._select

    def reload(self) -> dict[str, ssl.SSLContext]:
        table: dict[str, ssl.SSLContext] = {}
        for cert, key in self.pairs:
            ctx = self.make(cert, key)
            for name in _dns_names(cert):
                table.setdefault(name.lower(), ctx)
        self.by_name = table
        return table

    def covers(self, name: str) -> bool:
        """Whether a certificate file (serve.certs) answers for ``name``."""
        return self._lookup(self.by_name, name.lower()) is not None

    def set_managed(self, name: str, ctx: ssl.SSLContext | None) -> None:
        """Serve ``ctx`` for ``name`` from the next handshake on (None: no
        longer); established connections keep what they had."""
        if ctx is None:
            self.managed.pop(name, None)
        else:
            self.managed[name] = ctx

    @staticmethod
    def _lookup(table: dict, name: str) -> ssl.SSLContext | None:
        ctx = table.get(name)
        if ctx is None and "." in name:
            ctx = table.get("*." + name.split(".", 1)[1])
        return ctx

    def _select(self, sslobj, server_name, _ctx) -> None:
        if not server_name:
            return None
        name = server_name.lower()
        ctx = self._lookup(self.by_name, name) or self.managed.get(name)
        if ctx is not None:
            sslobj.context = ctx
        return None


def _dns_names(cert_file: str) -> list[str]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cert_file, "rb") as f:
        leaf = x509.load_pem_x509_certificates(f.read())[0]
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n for n in names if isinstance(n, str)]
