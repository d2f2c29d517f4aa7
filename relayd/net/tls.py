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


def unverified_client_context() -> ssl.SSLContext:
    """Only for fetching a CA certificate whose pin the caller then checks
    (join-token bootstrap); nothing secret is sent over it."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx
