"""Sign-in through an external OpenID Connect provider: the relying
party's half of the Authorization Code flow with PKCE (RFC 7636), as the
controller does it for `relayd login --provider NAME`.

The client (relayd login) makes the PKCE verifier, the state and the nonce,
sends the browser to the provider's authorization endpoint with a loopback
redirect (RFC 8252 section 7.3) and hands the code, its verifier and the
nonce to the controller, which alone holds the client secret:
``Provider.exchange`` posts the code to the token endpoint and
``Provider.verify_id_token`` checks the ID token: signature by a key of the
provider's JWKS (RS256, PS256, ES256 or EdDSA; the ``alg`` must be the
key's, never ``none`` or an HMAC), ``iss``, ``aud`` (and ``azp`` when there
are several audiences), ``exp``/``iat`` with 60 s of skew, and the nonce.
Discovery and the JWKS are fetched once and the JWKS again when a ``kid``
is unknown (key rotation), at most once a minute.

A provider that follows OpenID Connect Core 5.4 to the letter puts the
claims of the ``profile``/``email`` scopes (and its own, such as groups) in
the UserInfo answer, not in the ID token of a code flow:
``Provider.with_userinfo`` fetches them when the ID token lacks a claim
relayd uses, for the same ``sub`` only.

The provider is reached over https; plain http only to a loopback address
(a provider on the same host), for the issuer and for every endpoint its
discovery names. Redirects are not followed.

Blocking I/O (urllib): the controller runs it in a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from relayd.errors import AuthError, ConfigError

SKEW = 60
_MAX_DOC = 1 << 20


class ProviderError(AuthError):
    """The provider could not be asked (unreachable, a server error, an
    answer that is no JSON object): nothing was refused."""


class ProviderRefused(AuthError):
    """The provider answered a request with an OAuth error (RFC 6749
    section 5.2): ``error`` is its code, e.g. ``invalid_grant`` for a code
    that is spent, expired or another client's."""

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # a 3xx is an answer (an error), never followed


def check_url(url, what: str) -> str:
    """``url`` if it is https, or plain http to a loopback address."""
    u = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if u is not None and u.hostname and (u.scheme == "https" or u.scheme == "http" and _loopback(u.hostname)):
        return url
    raise ConfigError(f"{what} {str(url)[:200]!r}: https:// is required (plain http only to a loopback address)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unb64(s: str) -> bytes:
    if not isinstance(s, str):
        raise AuthError("id token: malformed")
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def pkce_challenge(verifier: str) -> str:
    """S256 (RFC 7636 section 4.2)."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def _int(b64: str) -> int:
    return int.from_bytes(_unb64(b64), "big")


def jwk_key(jwk: dict):
    """(public key, the alg it signs with) of one JWK; None for keys relayd
    does not use (encryption keys, symmetric keys)."""
    if jwk.get("use", "sig") != "sig":
        return None
    kty = jwk.get("kty")
    if kty == "RSA":
        return rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key(), jwk.get("alg", "RS256")
    if kty == "EC" and jwk.get("crv") == "P-256":
        return ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]), ec.SECP256R1()).public_key(), "ES256"
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(_unb64(jwk["x"])), "EdDSA"
    return None


def _check_sig(key, alg: str, signed: bytes, sig: bytes) -> None:
    try:
        if alg == "RS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "PS256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig, signed, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        elif alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey) and len(sig) == 64:
            key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")),
                       signed, ec.ECDSA(hashes.SHA256()))
        elif alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(sig, signed)
        else:
            raise AuthError("id token: algorithm does not match the key")
    except InvalidSignature:
        raise AuthError("id token: bad signature") from None


@dataclass
class Provider:
    """One external provider of the [zerotrust.providers.NAME] config."""

    name: str
    issuer: str
    client_id: str
    client_secret: str
    scopes: str = "openid profile email"
    #: The ID token claim that lists the user's groups, and the one that names them.
    groups_claim: str = "groups"
    username_claim: str = "sub"
    #: A CA file for the provider's HTTPS (default: the system's).
    ca: str | None = None
    _meta: dict | None = field(default=None, repr=False)
    _jwks: dict = field(default_factory=dict, repr=False)
    _jwks_at: float = field(default=0.0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _opener: urllib.request.OpenerDirector | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_url(self.issuer, f"config key 'zerotrust.providers.{self.name}.issuer':")

    def _get(self, url: str, data: bytes | None = None, headers: dict | None = None) -> dict:
        if self._opener is None:
            self._opener = urllib.request.build_opener(
                urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=self.ca)), _NoRedirect)
        req = urllib.request.Request(url, data=data, headers={"Accept": "application/json", **(headers or {})})
        try:
            with self._opener.open(req, timeout=10) as r:
                body = r.read(_MAX_DOC + 1)
        except urllib.error.HTTPError as exc:
            error = ""
            try:
                error = str(json.loads(exc.read(4096)).get("error", ""))[:64]
            except (ValueError, AttributeError):
                pass
            where = f"provider {self.name}: {url.split('?')[0]} answered {exc.code} {error}".strip()
            if 400 <= exc.code < 500 and error:
                raise ProviderRefused(where, error) from None
            raise ProviderError(where) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ProviderError(f"provider {self.name} is unreachable: {getattr(exc, 'reason', exc)}") from None
        if len(body) > _MAX_DOC:
            raise ProviderError(f"provider {self.name}: answer too large")
        try:
            doc = json.loads(body)
        except ValueError:
            raise ProviderError(f"provider {self.name}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise ProviderError(f"provider {self.name}: answer is not a JSON object")
        return doc

    def metadata(self) -> dict:
        with self._lock:
            if self._meta is None:
                meta = self._get(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
                if meta.get("issuer") != self.issuer:
                    raise ConfigError(f"provider {self.name}: discovery names issuer {meta.get('issuer')!r}, "
                                      f"not {self.issuer!r}")
                for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                    if not isinstance(meta.get(k), str):
                        raise ConfigError(f"provider {self.name}: discovery lacks {k}")
                for k in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint"):
                    if k in meta:
                        check_url(meta[k], f"provider {self.name}: discovery's {k}")
                self._meta = meta
            return self._meta

    def public_info(self) -> dict:
        """What a client needs to start the flow (no secret)."""
        m = self.metadata()
        return {"type": "oidc", "issuer": self.issuer, "authorization_endpoint": m["authorization_endpoint"],
                "client_id": self.client_id, "scopes": self.scopes}

    def _key(self, kid):
        now = time.monotonic()
        with self._lock:
            if kid not in self._jwks and now - self._jwks_at > 60 or not self._jwks_at:
                doc = self._get(self._meta["jwks_uri"])
                keys = {}
                for jwk in doc.get("keys", []):
                    try:
                        k = jwk_key(jwk)
                    except (KeyError, ValueError, TypeError):
                        continue
                    if k is not None:
                        keys[jwk.get("kid")] = k
                self._jwks, self._jwks_at = keys, now
            return self._jwks.get(kid)

    def exchange(self, code: str, verifier: str, redirect_uri: str) -> dict:
        """The code at the token endpoint: its answer (with ``id_token``)."""
        m = self.metadata()
        basic = base64.b64encode(f"{urllib.parse.quote(self.client_id)}:"
                                 f"{urllib.parse.quote(self.client_secret)}".encode()).decode()
        body = urllib.parse.urlencode({"grant_type": "authorization_code", "code": code,
                                       "redirect_uri": redirect_uri, "code_verifier": verifier}).encode()
        return self._get(m["token_endpoint"], body, {"Authorization": "Basic " + basic,
                                                    "Content-Type": "application/x-www-form-urlencoded"})

    def verify_id_token(self, token, nonce: str, now: float) -> dict:
        claims = self.verify_token(token, now)
        if not isinstance(claims.get("nonce"), str) or not hmac.compare_digest(claims["nonce"], nonce or ""):
            raise AuthError("id token: wrong nonce")
        return claims

    def verify_token(self, token, now: float) -> dict:
        """A token of this provider presented as a bearer credential (the
        device API, relayd.control.devices): every check of
        ``verify_id_token`` but the nonce, which only the sign-in that asked
        for the token knows."""
        if not isinstance(token, str) or len(token) > 32768 or token.count(".") != 2:
            raise AuthError("id token: malformed")
        h, p, s = token.split(".")
        try:
            header = json.loads(_unb64(h))
            claims = json.loads(_unb64(p))
            sig = _unb64(s)
        except (ValueError, TypeError):
            raise AuthError("id token: malformed") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise AuthError("id token: malformed")
        alg = header.get("alg")
        if alg not in ("RS256", "PS256", "ES256", "EdDSA"):
            raise AuthError(f"id token: algorithm {str(alg)[:16]!r} refused")
        self.metadata()
        found = self._key(header.get("kid"))
        if found is None:
            raise AuthError("id token: signed by a key the provider does not publish")
        _check_sig(found[0], alg, f"{h}.{p}".encode(), sig)
        if claims.get("iss") != self.issuer:
            raise AuthError("id token: wrong issuer")
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if self.client_id not in auds or (len(auds) > 1 and claims.get("azp") != self.client_id):
            raise AuthError("id token: not for this client")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int) or not isinstance(iat, int) or now >= exp + SKEW or iat > now + SKEW:
            raise AuthError("id token: expired or not yet valid")
        return claims

    def with_userinfo(self, claims: dict, answer: dict) -> dict:
        """The verified ID token's claims, completed from the UserInfo
        endpoint (with the token answer's access token) when one relayd
        uses is missing. Only those claims are taken, and only when the
        answer's ``sub`` is the ID token's (OpenID Connect Core 5.3.4)."""
        wanted = {self.username_claim, self.groups_claim, "email"} - set(claims)
        url = self.metadata().get("userinfo_endpoint")
        token = answer.get("access_token")
        if not wanted or not isinstance(url, str) or not isinstance(token, str):
            return claims
        info = self._get(url, headers={"Authorization": "Bearer " + token})
        if info.get("sub") != claims.get("sub"):
            raise AuthError("userinfo: the answer is about another subject")
        return {**{k: info[k] for k in wanted if k in info}, **claims}
