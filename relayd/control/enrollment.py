"""Enrollment and renewal: the control plane's answer to an agent's
``enroll`` and ``renew`` requests (relayd.core.wire), and the identity check
every request with a client certificate passes.

The join token is checked before the CA signs anything for the peer, and
spent in the transaction that records the agent: a refusal (a bad CSR) or a
failure (a full disk) on the way leaves it valid.
"""

from __future__ import annotations

import logging
import secrets

from relayd import metrics
from relayd.control.ca import CertificateAuthority, cert_info
from relayd.control.store import AsyncStore
from relayd.core import wire
from relayd.errors import AuthError, RevokedError

log = logging.getLogger("relayd.enrollment")


class Enrollment:
    def __init__(self, db: AsyncStore, ca: CertificateAuthority, cert_ttl: float, wss_address) -> None:
        self.db = db
        self.ca = ca
        self.cert_ttl = cert_ttl  # seconds
        self._wss = wss_address  # () -> the relay's WebSocket address, or None

    async def peer_identity(self, transport) -> tuple[str, int]:
        """(agent id, certificate serial) of the TLS peer's client
        certificate; AuthError if it has none, RevokedError if it is revoked
        or unknown."""
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            raise AuthError("this request needs the agent's client certificate")
        from cryptography import x509

        if not self.ca.issued(x509.load_der_x509_certificate(der)):
            # The HTTPS port also verifies user certificates (zero-trust).
            raise AuthError("the client certificate is not from the agent CA")
        info = cert_info(der)
        agent_id = info.get("agent_id") or info.get("common_name")
        if not agent_id:
            raise AuthError("client certificate names no agent")
        if await self.db("is_revoked", agent_id, info["serial"]):
            raise RevokedError(f"agent {agent_id}: certificate revoked or unknown")
        return agent_id, info["serial"]

    async def enroll(self, req: wire.EnrollRequest, peer: str) -> dict:
        await self.db("check_join_token", req.token_id, req.secret)
        agent_id = "ag-" + secrets.token_hex(6)
        cert = self.ca.sign_agent_csr(req.csr.encode(), agent_id, days=self.cert_ttl / 86400)
        info = cert_info(cert)
        endpoints = await self.db("enroll_agent", req.token_id, req.secret, agent_id, info["serial"],
                                  info["not_after"].timestamp())
        metrics.ENROLLMENTS.labels("enroll", "success").inc()
        log.info("agent enrolled", extra={"agent": agent_id, "peer": peer, "allowed": ",".join(endpoints) or "*"})
        return wire.ok_reply(agent_id=agent_id, cert=cert.decode(), ca=self.ca.cert_pem.decode(), wss=self._wss())

    async def renew(self, req: wire.RenewRequest, ident: tuple[str, int], peer: str) -> dict:
        agent_id, _ = ident
        cert = self.ca.sign_agent_csr(req.csr.encode(), agent_id, days=self.cert_ttl / 86400)
        info = cert_info(cert)
        await self.db("update_agent_cert", agent_id, info["serial"], info["not_after"].timestamp())
        metrics.ENROLLMENTS.labels("renew", "success").inc()
        log.info("agent certificate renewed", extra={"agent": agent_id, "peer": peer})
        return wire.ok_reply(cert=cert.decode())
