"""The zero-trust controller: sign-in, the user CA, claims and entitlement
tokens, step-up and revocation (``../shared/specs/zero-trust.md`` sections
3, 4, 7, 8 and 9). Pure Python, blocking (the store and argon2 take
milliseconds): the relay calls it from a worker thread.

Theory of operation
-------------------
``login`` authenticates (relayd's own directory: argon2id and TOTP; or an
OpenID Connect provider's ID token from a code + PKCE exchange), refuses a
locked user or one a Stop policy names, registers the device (or checks its
on-boarding secret), signs the client's CSR with the user CA (distinct from
the agent CA) for the DN ``CN=<device>,CN=<user>,OU=<provider>`` and returns
a claims token bound to that certificate (``cnf``). ``entitlements`` runs
the policies over the user's claims and returns one token per site.
``renew`` and ``stepup`` re-issue the claims token of a live session (same
``sid``); a step-up never moves ``exp``.

Every token check the controller and the gateways make goes through
``check_token``, in the spec's order (4.3), so a refusal always has the
same reason label (``relayd_token_rejections_total{reason}``).

Revocation: ``revoke`` appends an entry to the store's log (and ends the
matching sessions in the same transaction, for kill and lock); the
``RevocationView`` holds the entries still in force, is fed in order by
``seq`` (a gap makes it fetch from the store) and answers ``revoked(token)``.
Listeners (the gateway) hear every new entry at once in this process; other
processes' entries (`relayd admin revoke`) arrive through ``poll``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd import metrics
from relayd.control import jws, totp
from relayd.control.ca import CertificateAuthority, subject_triple, user_subject, write_private
from relayd.control.oidc import Provider, ProviderError, ProviderRefused
from relayd.control.policy import Policy
from relayd.control.ztstore import LOCAL, ZtStore
from relayd.errors import AuthError, ConfigError, RelaydError

log = logging.getLogger("relayd.zerotrust")

USER_CA_DIR = "ca-users"
SIGNING_KEY = "zt-signing.key"
_DEVICE_ID = re.compile(r"[0-9a-f]{32}\Z")
_LOCAL_NAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}\Z")
_HEX128 = re.compile(r"[0-9a-f]{32}\Z")
MAX_DEVICE_CLAIMS = 8 * 1024
TYPES = ("claims", "entitlements")
#: kill: tokens issued up to this many seconds after the kill are covered
#: too (controller clocks a little apart).
KILL_SKEW = 5.0
#: The longest renewal delay, and the longest lock (a lock without an end: this long).
MAX_RENEW_DELAY = 7 * 86400.0
MAX_LOCK = 100 * 365 * 86400.0
#: Wrong one-time codes of one user (sign-in and step-up together) within
#: OTP_WINDOW seconds after which every code of theirs is refused until the
#: window has passed: six digits must not be guessable at the rate a client
#: can ask (with one step of drift, three codes in a million pass).
MAX_OTP_FAILURES = 5
OTP_WINDOW = 300.0
#: Wrong passwords of one user (sign-in and step-up) within OTP_WINDOW after
#: which their password is refused until the window has passed. Higher than
#: for codes: anyone who knows a user name can spend this budget and keep
#: the user out for the window (the log line says so); an online guesser
#: gets 10 tries in 5 minutes.
MAX_PASSWORD_FAILURES = 10


class Refused(AuthError):
    """A refusal with an HTTP status and a reason label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def reject(reason: str, message: str, status: int = 401) -> Refused:
    metrics.ZT_TOKEN_REJECTIONS.labels(reason).inc()
    return Refused(status, reason, message)


@dataclass
class ZtConfig:
    """[zerotrust]: the controller's lifetimes and limits, the site this
    relay is the gateway of, the external providers."""

    site: str | None = None
    claims_ttl: float = 12 * 3600.0
    entitlement_ttl: float = 3600.0
    device_limit: int = 100
    #: strict: no new session or flow when the revocation view is older than max_staleness
    revocation_mode: str = "strict"
    max_staleness: float = 300.0
    providers: dict = field(default_factory=dict)  # name -> relayd.control.oidc.Provider
    #: TUN mode: the addresses this gateway gives clients' TUN devices (one
    #: each; give each gateway of a site its own pool), and their MTU
    tun_pool: str = "100.96.0.0/16"
    tun_mtu: int = 1400

    def validate(self) -> "ZtConfig":
        if self.revocation_mode not in ("strict", "best_effort"):
            raise ConfigError("config key 'zerotrust.revocation_mode': strict or best_effort")
        if not 60 <= self.claims_ttl <= 7 * 86400:
            raise ConfigError("config key 'zerotrust.claims_ttl': between 1m and 7d")
        if not 60 <= self.entitlement_ttl <= self.claims_ttl:
            raise ConfigError("config key 'zerotrust.entitlement_ttl': between 1m and claims_ttl")
        if LOCAL in self.providers or "totp" in self.providers:
            raise ConfigError("config key 'zerotrust.providers': 'local' and 'totp' are relayd's own")
        try:
            pool = ipaddress.ip_network(self.tun_pool)
        except ValueError:
            raise ConfigError("config key 'zerotrust.tun_pool': an IPv4 network such as 100.96.0.0/16") from None
        if pool.version != 4 or pool.prefixlen > 30:
            raise ConfigError("config key 'zerotrust.tun_pool': an IPv4 network of at least 4 addresses")
        if not 576 <= self.tun_mtu <= 65535:
            raise ConfigError("config key 'zerotrust.tun_mtu': between 576 and 65535")
        return self


def cert_thumbprint(der: bytes) -> str:
    """``x5t#S256``: base64url SHA-256 of the certificate's DER."""
    return jws._b64(hashlib.sha256(der).digest())


def dn_string(provider: str, username: str, device_id: str) -> str:
    return user_subject(provider, username, device_id).rfc4514_string()


def _load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return key
    if os.stat(path).st_mode & 0o077:
        raise ConfigError(f"{path} is accessible by group or others; run: chmod 600 {path}")
    key = serialization.load_pem_private_key(data, None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return key


def selector_matches(sel: dict, tok: dict) -> bool:
    """Does a revocation selector cover this token's (or session's) facts:
    ``sid, jti, provider, username, device, site``."""
    if sel.get("all") is True:
        return True
    for k in ("sid", "jti", "device", "provider", "site"):
        if k in sel and sel[k] != tok.get(k):
            return False
    if "user" in sel and list(sel["user"]) != [tok.get("provider"), tok.get("username")]:
        return False
    return bool(set(sel) & {"sid", "jti", "device", "provider", "site", "user"})


def token_facts(payload: dict) -> dict:
    """The selector-relevant facts of a verified claims or entitlement token."""
    user = payload.get("user") or {}
    dev = payload.get("device") or {}
    prov, name, devid = payload.get("_triple", (user.get("provider"), user.get("username"), dev.get("id")))
    return {"sid": payload.get("sid"), "jti": payload.get("jti"), "provider": prov, "username": name,
            "device": devid, "site": payload.get("site"), "iat": payload.get("iat", 0),
            "tt": payload.get("tt")}


class RevocationView:
    """The revocation entries in force, applied in ``seq`` order."""

    def __init__(self, zs: ZtStore) -> None:
        self.zs = zs
        self.entries: dict[int, dict] = {}
        self.seq = 0
        self.fresh_at = time.monotonic()

    def load(self) -> list[dict]:
        """Fetch what is new in the store (a gap, a reconnect, another
        process's revoke): the new entries."""
        new = self.zs.revocations(self.seq)
        for e in new:
            self.entries[e["seq"]] = e
            self.seq = max(self.seq, e["seq"])
        self.fresh_at = time.monotonic()
        now = time.time()
        for s in [s for s, e in self.entries.items() if e["expires_at"] <= now]:
            del self.entries[s]
        return new

    def apply(self, entry: dict) -> bool:
        """One published entry; False when it does not follow the last one
        (the caller then ``load``s)."""
        if entry["seq"] != self.seq + 1:
            return False
        self.entries[entry["seq"]] = entry
        self.seq = entry["seq"]
        return True

    def revoked(self, facts: dict, now: float) -> dict | None:
        """The entry that revokes a token with these facts, or None."""
        for e in self.entries.values():
            if e["op"] not in ("kill", "renew") or now < e["effective_at"]:
                continue
            if facts["tt"] not in e["types"] or facts["iat"] >= e["issued_before"]:
                continue
            if facts["tt"] == "claims" and "site" in e["selector"]:
                continue  # a site selector names entitlement tokens only
            if selector_matches(e["selector"], facts):
                return e
        return None

    def locked(self, facts: dict, now: float) -> dict | None:
        for e in self.entries.values():
            if e["op"] == "lock" and e["effective_at"] <= now < e["expires_at"] \
                    and selector_matches(e["selector"], facts):
                return e
        return None


class Controller:
    def __init__(self, data: Path, zs: ZtStore, cfg: ZtConfig, clock=time.time) -> None:
        self.zs = zs
        self.cfg = cfg
        self.clock = clock
        self.user_ca = CertificateAuthority.load_or_create(Path(data) / USER_CA_DIR, name="relayd user CA")
        self.signing = _load_signing_key(Path(data) / SIGNING_KEY)
        pub = self.signing.public_key()
        self.kid = jws.key_id(pub)
        #: The pinned controller keys a gateway accepts (kid -> public key).
        self.keys = {self.kid: pub}
        self.issuer = "relayd:ctl:" + self.kid[:8]
        self.hasher = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters
        self._dummy = self.hasher.hash(secrets.token_hex(16))
        self.view = RevocationView(zs)
        self.view.load()
        #: Called with each new revocation entry (the gateway's sessions).
        self.listeners: list = []
        self._failures: dict[tuple, list] = {}  # (what, provider, username) -> monotonic times
        self._failures_lock = threading.Lock()  # the controller runs in worker threads

    # -- users ---------------------------------------------------------------

    def add_user(self, username: str, password: str, *, groups=(), email: str | None = None,
                 with_totp: bool = False) -> str | None:
        """A user of relayd's own directory; the TOTP secret if asked."""
        check_local_name(username)
        if len(password) < 8:
            raise ConfigError("a password has at least 8 characters")
        secret = totp.new_secret() if with_totp else None
        self.zs.add_user(LOCAL, username, password_hash=self.hasher.hash(password), totp_secret=secret,
                         email=email, groups=groups)
        return secret

    def _password_ok(self, user: dict | None, password) -> bool:
        """The password is the user's (the same time when there is no such
        user); ``too_many_attempts`` after MAX_PASSWORD_FAILURES wrong ones
        in OTP_WINDOW, right or wrong."""
        key = ("password", LOCAL, user["username"]) if user else None
        if key is not None:
            self._within_budget(key, MAX_PASSWORD_FAILURES, "passwords")
        if not isinstance(password, str) or len(password) > 1024:
            ok = False
        else:
            h = user["password_hash"] if user and user.get("password_hash") else self._dummy
            try:
                ok = self.hasher.verify(h, password)
            except (VerificationError, InvalidHashError):
                ok = False
            ok = ok and bool(user and user.get("password_hash"))
        if not ok and key is not None:
            self._failed(key, MAX_PASSWORD_FAILURES, "passwords")
        return ok

    def _totp_ok(self, provider: str, username: str, user: dict, code) -> bool:
        """The code is right and unused (then spent); ``too_many_attempts``
        after MAX_OTP_FAILURES wrong ones in OTP_WINDOW, right or wrong."""
        key = ("otp", provider, username)
        self._within_budget(key, MAX_OTP_FAILURES, "one-time codes")
        step = totp.verify(user["totp_secret"], code, self.clock(), user["totp_step"])
        ok = step is not None and self.zs.spend_totp_step(provider, username, step)
        if not ok:
            self._failed(key, MAX_OTP_FAILURES, "one-time codes")
        return ok

    def _within_budget(self, key: tuple, limit: int, what: str) -> None:
        now = time.monotonic()
        with self._failures_lock:
            recent = [t for t in self._failures.pop(key, ()) if now - t < OTP_WINDOW]
            if recent:
                self._failures[key] = recent
            if len(recent) >= limit:
                raise reject("too_many_attempts", f"too many wrong {what}: try again in a few minutes", 429)

    def _failed(self, key: tuple, limit: int, what: str) -> None:
        with self._failures_lock:
            failures = self._failures.setdefault(key, [])
            failures.append(time.monotonic())
            if len(failures) == limit:
                log.warning(f"{what} refused for a while: too many wrong ones", extra={
                    "user": key[2], "provider": key[1], "seconds": OTP_WINDOW, "reason": "too_many_attempts"})

    # -- sign-in -----------------------------------------------------------------

    def providers(self) -> dict:
        out = {LOCAL: {"type": "local"}}
        for name, p in self.cfg.providers.items():
            try:
                out[name] = p.public_info()
            except RelaydError as exc:
                out[name] = {"type": "oidc", "error": str(exc)}
        return out

    def login(self, body: dict, login_ip: str) -> dict:
        now = int(self.clock())
        provider = body.get("provider", LOCAL)
        if not isinstance(provider, str):
            raise reject("bad_request", "provider must be a string", 400)
        methods = []
        stepup = {}
        if provider == LOCAL:
            username = body.get("username")
            if not isinstance(username, str) or not _LOCAL_NAME.match(username):
                self._password_ok(None, "x" * 8)  # same time as a wrong password
                raise reject("bad_credentials", "wrong username or password")
            user = self.zs.get_user(LOCAL, username)
            if not self._password_ok(user, body.get("password")):
                raise reject("bad_credentials", "wrong username or password")
            methods.append("pwd")
            # Locked or disabled? Before the code is checked: a refused sign-in must not spend it.
            self._not_locked({"provider": LOCAL, "username": username, "device": body.get("device_id")}, now)
            self._not_disabled(user)
            if user["totp_secret"]:
                if "otp" not in body:
                    raise reject("otp_required", "this user needs a one-time code (--otp)")
                if not self._totp_ok(LOCAL, username, user, body.get("otp")):
                    raise reject("bad_otp", "wrong or already used one-time code")
                methods.append("otp")
                stepup["otp:login"] = {"at": now, "p": "totp"}
            attrs = {}
        else:
            prov = self.cfg.providers.get(provider)
            if prov is None:
                raise reject("unknown_provider", f"no provider {provider[:64]!r}", 400)
            claims = self._oidc(prov, body, now)
            username = normalize_external(claims.get(prov.username_claim))
            groups = claims.get(prov.groups_claim, [])
            attrs = {"groups": [g for g in groups if isinstance(g, str)][:256] if isinstance(groups, list) else []}
            email = claims.get("email") if isinstance(claims.get("email"), str) else None
            self.zs.ensure_user(provider, username, email, attrs)
            user = self.zs.get_user(provider, username)
            self._not_disabled(user)
            methods.append("oidc")
        facts = {"provider": provider, "username": username, "device": body.get("device_id")}
        self._not_locked(facts, now)
        user_claims = self.user_claims(user, attrs)
        policy = self.zs.policy()
        _, stop = policy.select(user_claims)
        if stop is not None:
            raise reject("stop_policy", f"sign-in refused by policy {stop}", 403)
        device_id = body.get("device_id")
        if not isinstance(device_id, str) or not _DEVICE_ID.match(device_id):
            raise reject("bad_device_id", "device_id must be 32 lowercase hex digits", 400)
        reported = device_claims(body.get("device_claims", {}))
        new_secret = secrets.token_hex(32)
        try:
            created = self.zs.register_device(
                device_id, provider, username, body.get("onboarding_secret"), new_secret,
                reported.get("hostname") if isinstance(reported.get("hostname"), str) else None,
                self.cfg.device_limit, now)
        except AuthError as exc:
            raise reject("device_registration", str(exc), 403) from None
        sid = secrets.token_hex(16)
        exp = now + int(self.cfg.claims_ttl)
        cert = self._certificate(body.get("csr"), provider, username, device_id, sid, exp)
        der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        auth = {"time": now, "methods": methods, "login_ip": login_ip}
        self.zs.create_session({"sid": sid, "provider": provider, "username": username, "device_id": device_id,
                                "cert_sha256": cert_thumbprint(der), "created_at": now, "expires_at": exp,
                                "auth": auth, "stepup": stepup})
        token = self._claims_token(sid, user_claims, device_id, reported, auth, stepup, der, now, exp)
        metrics.ZT_LOGINS.labels(provider if provider == LOCAL else "oidc", "success").inc()
        log.info("user signed in", extra={"user": username, "provider": provider, "device": device_id,
                                          "sid": sid, "peer": login_ip})
        out = {"claims_token": token, "certificate": cert.decode(), "ca_chain": self.user_ca.cert_pem.decode(),
               "sid": sid, "expires_at": exp, "sites": self.sites_for(policy, user_claims)}
        if created:
            out["onboarding_secret"] = new_secret
        return out

    def check_local_user(self, username, password, otp=None) -> dict:
        """A user of relayd's own directory proving who they are without a
        session (the device API's password grant, relayd.control.devices):
        the same checks, limits and refusals as a local sign-in (password,
        then the one-time code if the user has an authenticator, then
        disabled or locked). Returns the user."""
        if not isinstance(username, str) or not _LOCAL_NAME.match(username):
            self._password_ok(None, "x" * 8)  # same time as a wrong password
            raise reject("bad_credentials", "wrong username or password")
        user = self.zs.get_user(LOCAL, username)
        if not self._password_ok(user, password):
            raise reject("bad_credentials", "wrong username or password")
        self._not_locked({"provider": LOCAL, "username": username, "device": None}, int(self.clock()))
        self._not_disabled(user)
        if user["totp_secret"]:
            if otp is None:
                raise reject("otp_required", "this user needs a one-time code (otp)")
            if not self._totp_ok(LOCAL, username, user, otp):
                raise reject("bad_otp", "wrong or already used one-time code")
        return user

    def _oidc(self, prov: Provider, body: dict, now: int) -> dict:
        for k in ("code", "code_verifier", "redirect_uri", "nonce"):
            if not isinstance(body.get(k), str) or not 0 < len(body[k]) <= 2048:
                raise reject("bad_request", f"an OpenID Connect sign-in needs {k}", 400)
        if not body["redirect_uri"].startswith(("http://127.0.0.1:", "http://[::1]:", "http://localhost:")):
            raise reject("bad_request", "the redirect must be a loopback address (RFC 8252)", 400)
        try:
            answer = prov.exchange(body["code"], body["code_verifier"], body["redirect_uri"])
        except ProviderRefused as exc:
            # invalid_grant: the code is spent, expired or another client's,
            # or the PKCE verifier is not its own (RFC 6749 section 5.2)
            raise reject("bad_code" if exc.error == "invalid_grant" else "provider_refused", str(exc)) from None
        except (ProviderError, ConfigError) as exc:
            raise reject("provider_unavailable", str(exc), 502) from None
        try:
            return prov.with_userinfo(prov.verify_id_token(answer.get("id_token"), body["nonce"], now), answer)
        except (ProviderError, ConfigError) as exc:
            raise reject("provider_unavailable", str(exc), 502) from None
        except AuthError as exc:
            raise reject("bad_id_token", str(exc)) from None

    def user_claims(self, user: dict, attrs: dict | None = None) -> dict:
        groups = sorted(set(user.get("groups", [])) | set((attrs or user.get("attrs") or {}).get("groups", [])))
        out = {"username": user["username"], "provider": user["provider"], "groups": groups}
        if user.get("email"):
            out["email"] = user["email"]
        return out

    def sites_for(self, policy: Policy, user_claims: dict) -> list[dict]:
        ids, _ = policy.select(user_claims)
        sites = sorted({policy.entitlements[e]["site"] for e in ids})
        return [{"id": s, "name": policy.sites[s]["name"], "networks": policy.sites[s]["networks"],
                 "gateways": policy.sites[s].get("gateways", [])} for s in sites if s in policy.sites]

    def _not_locked(self, facts: dict, now: float) -> None:
        self.view.load()
        e = self.view.locked(facts, max(now, self.clock()))  # the token times are whole seconds: not those
        if e is not None:
            raise reject("locked", f"locked by an administrator: {e['reason'] or 'no reason given'}", 403)

    @staticmethod
    def _not_disabled(user: dict) -> None:
        if user.get("disabled_at") is not None:
            raise reject("disabled", "this account is disabled: ask an administrator", 403)

    def _certificate(self, csr, provider, username, device_id, sid, exp) -> bytes:
        if not isinstance(csr, str) or len(csr) > 8192:
            raise reject("bad_csr", "a certificate request (PEM) is required", 400)
        try:
            return self.user_ca.sign_user_csr(csr.encode(), provider, username, device_id, sid, exp + 60)
        except AuthError as exc:
            raise reject("bad_csr", str(exc), 400) from None

    def _claims_token(self, sid, user_claims, device_id, reported, auth, stepup, der, now, exp,
                      registered_at=None) -> str:
        payload = {"iss": self.issuer, "sub": dn_string(user_claims["provider"], user_claims["username"], device_id),
                   "aud": ["relayd:controller", "relayd:gateway"], "tt": "claims", "pv": self.zs.pv(),
                   "iat": now, "nbf": now - 60, "exp": exp, "jti": secrets.token_hex(16), "sid": sid,
                   "cnf": {"x5t#S256": cert_thumbprint(der)}, "user": user_claims,
                   "device": {"id": device_id, "reported": reported}, "auth": auth, "stepup": stepup}
        return jws.sign(payload, jws.CLAIMS, self.signing)

    # -- checks shared with the gateway ---------------------------------------------

    def check_token(self, token, typ: str, cert_der: bytes | None, *, site: str | None = None,
                    audience: str = "relayd:gateway", now: float | None = None) -> dict:
        """Steps 1-5 of the spec's 4.3 for one token presented with the
        TLS client certificate ``cert_der``: its payload, with ``_triple``
        (provider, username, device) of the certificate. ``reject`` with
        the first reason otherwise."""
        now = self.clock() if now is None else now
        if not cert_der:
            raise reject("no_certificate", "a client certificate from the user CA is required")
        cert = x509.load_der_x509_certificate(cert_der)
        if not self.user_ca.issued(cert):
            raise reject("wrong_ca", "the client certificate is not from the user CA")
        if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
            raise reject("certificate_expired", "the client certificate is expired or not yet valid")
        try:
            p = jws.verify(token, typ, self.keys)
        except jws.TokenError as exc:
            raise reject(exc.reason, f"token refused: {exc}") from None
        if p.get("iss") != self.issuer:
            raise reject("issuer", "token from another issuer")
        aud = p.get("aud")
        if typ == jws.CLAIMS:
            if not isinstance(aud, list) or audience not in aud or p.get("tt") != "claims":
                raise reject("audience", "not a claims token for this audience")
        elif typ == jws.ENTITLEMENTS:
            if p.get("tt") != "entitlements" or site is None or aud != f"relayd:site:{site}" \
                    or p.get("site") != site:
                raise reject("wrong_site", "entitlement token for another site")
        else:
            raise reject("type", "unexpected token type")
        try:
            jws.check_window(p, now)
        except jws.TokenError as exc:
            raise reject(exc.reason, f"token refused: {exc}") from None
        triple = subject_triple(cert)
        if triple is None or p.get("sub") != cert.subject.rfc4514_string() \
                or p.get("sub") != dn_string(*triple):
            raise reject("dn_mismatch", "the token's subject is not the certificate's")
        if typ == jws.CLAIMS:
            user, dev = p.get("user") or {}, p.get("device") or {}
            if (user.get("provider"), user.get("username"), dev.get("id")) != triple:
                raise reject("dn_mismatch", "the token's subject is not the certificate's")
        cnf = p.get("cnf")
        if not isinstance(cnf, dict) or cnf.get("x5t#S256") != cert_thumbprint(cert_der):
            raise reject("cnf_mismatch", "the token is bound to another certificate")
        if not isinstance(p.get("sid"), str) or not _HEX128.match(p["sid"]):
            raise reject("malformed", "token without a session id")
        p["_triple"] = triple
        e = self.view.revoked(token_facts(p), max(now, self.clock()))
        if e is not None:
            raise reject("revoked", f"token revoked: {e['reason'] or e['op']}", 403)
        return p

    def _live_session(self, claims: dict, cert_der: bytes):
        def check(s: dict) -> None:
            if s["state"] != "active":
                raise reject("session_revoked", "this sign-in was revoked: sign in again", 403)
            if s["cert_sha256"] != cert_thumbprint(cert_der):
                raise reject("cnf_mismatch", "the session is bound to another certificate")
        return check

    # -- entitlements, renewal, step-up ---------------------------------------------

    def entitlements(self, token, cert_der: bytes) -> dict:
        now = int(self.clock())
        p = self.check_token(token, jws.CLAIMS, cert_der, audience="relayd:controller", now=now)
        sess = self.zs.get_session(p["sid"])
        if sess is None:
            raise reject("session_revoked", "unknown session", 403)
        self._live_session(p, cert_der)(sess)
        policy = self.zs.policy()
        ids, stop = policy.select(p["user"])
        if stop is not None:
            raise reject("stop_policy", f"refused by policy {stop}", 403)
        by_site: dict = {}
        for eid in ids:
            ent = policy.entitlements[eid]
            by_site.setdefault(ent["site"], []).append(ent)
        exp = min(now + int(self.cfg.entitlement_ttl), p["exp"])
        tokens = {}
        for site, ents in sorted(by_site.items()):
            conds = {c: policy.conditions[c] for e in ents for c in e["conditions"] if c in policy.conditions}
            payload = {"iss": self.issuer, "sub": p["sub"], "sid": p["sid"], "cnf": p["cnf"],
                       "aud": f"relayd:site:{site}", "site": site, "tt": "entitlements", "pv": policy.pv,
                       "iat": now, "nbf": now - 60, "exp": exp, "jti": secrets.token_hex(16),
                       "conditions": conds, "entitlements": ents}
            tokens[site] = jws.sign(payload, jws.ENTITLEMENTS, self.signing)
        return {"entitlement_tokens": tokens, "sites": self.sites_for(policy, p["user"]), "pv": policy.pv}

    def renew(self, token, cert_der: bytes, body: dict) -> dict:
        """A new certificate (from a new CSR) and claims token for a live
        session: the user's groups and the policy read again, the same sid,
        the step-ups kept with their times."""
        now = int(self.clock())
        p = self.check_token(token, jws.CLAIMS, cert_der, audience="relayd:controller", now=now)
        provider, username, device_id = p["_triple"]
        self._not_locked({"provider": provider, "username": username, "device": device_id, "sid": p["sid"]}, now)
        user = self.zs.get_user(provider, username)
        if user is None:
            raise reject("session_revoked", "the user no longer exists", 403)
        user_claims = self.user_claims(user)
        policy = self.zs.policy()
        if policy.select(user_claims)[1] is not None:
            raise reject("stop_policy", "refused by policy", 403)
        exp = now + int(self.cfg.claims_ttl)
        cert = self._certificate(body.get("csr"), provider, username, device_id, p["sid"], exp)
        der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
        sess = self.zs.update_session(p["sid"], self._live_session(p, cert_der),
                                      {"cert_sha256": cert_thumbprint(der), "expires_at": exp})
        reported = device_claims(body.get("device_claims", (p.get("device") or {}).get("reported", {})))
        token = self._claims_token(p["sid"], user_claims, device_id, reported, sess["auth"], sess["stepup"], der,
                                   now, exp)
        metrics.ZT_RENEWALS.labels("success").inc()
        return {"claims_token": token, "certificate": cert.decode(), "ca_chain": self.user_ca.cert_pem.decode(),
                "sid": p["sid"], "expires_at": exp, "sites": self.sites_for(policy, user_claims)}

    def stepup(self, token, cert_der: bytes, body: dict) -> dict:
        """Verify a remedy's answer (a TOTP code, the password again, or a
        fresh sign-in at an external provider) and re-issue the claims
        token with ``stepup[method:suffix]`` set; ``exp`` unchanged."""
        now = int(self.clock())
        p = self.check_token(token, jws.CLAIMS, cert_der, audience="relayd:controller", now=now)
        provider, username, device_id = p["_triple"]
        self._not_locked({"provider": provider, "username": username, "device": device_id, "sid": p["sid"]}, now)
        method, suffix, via = body.get("method"), body.get("suffix"), body.get("provider")
        if method not in ("otp", "password") or not isinstance(suffix, str) or not isinstance(via, str):
            raise reject("bad_request", "a step-up names method (otp|password), suffix and provider", 400)
        policy = self.zs.policy()
        ids, _ = policy.select(p["user"])
        wanted = {(r["type"], r["suffix"], r.get("provider")) for r in policy.remedies_for(ids) if "suffix" in r}
        if (method, suffix, via) not in wanted:
            # A weaker provider cannot fill a suffix another one is asked for.
            raise reject("stepup_not_offered", "no entitlement of this user asks for this step-up", 403)
        user = self.zs.get_user(provider, username)
        if user is None:
            raise reject("session_revoked", "the user no longer exists", 403)
        cred = body.get("credential")
        if method == "otp":
            if via != "totp" or not user.get("totp_secret"):
                raise reject("stepup_failed", "no authenticator enrolled for this user", 403)
            if not self._totp_ok(provider, username, user, cred):
                raise reject("bad_otp", "wrong or already used one-time code")
        elif via == LOCAL:
            if provider != LOCAL or not self._password_ok(user, cred):
                raise reject("bad_credentials", "wrong password")
        else:
            prov = self.cfg.providers.get(via)
            if prov is None or provider != via or not isinstance(cred, dict):
                raise reject("stepup_failed", "password step-up through this provider is not possible", 403)
            claims = self._oidc(prov, cred, now)
            if normalize_external(claims.get(prov.username_claim)) != username:
                raise reject("stepup_failed", "signed in as somebody else", 403)
            auth_time = claims.get("auth_time")
            if not isinstance(auth_time, int) or auth_time <= p["auth"]["time"] or auth_time < now - 300:
                raise reject("stepup_failed", "the provider did not ask for the password again", 403)

        def check(s):
            self._live_session(p, cert_der)(s)

        sess = self.zs.get_session(p["sid"])
        if sess is None:
            raise reject("session_revoked", "unknown session", 403)
        stepups = dict(sess["stepup"])
        stepups[f"{method}:{suffix}"] = {"at": now, "p": via}
        sess = self.zs.update_session(p["sid"], check, {"stepup": stepups})
        der_cnf = cert_der
        reported = (p.get("device") or {}).get("reported", {})
        token = self._claims_token(p["sid"], p["user"], device_id, reported, sess["auth"], stepups, der_cnf, now,
                                   p["exp"])
        metrics.ZT_STEPUPS.labels(method, "success").inc()
        log.info("step-up", extra={"user": username, "sid": p["sid"], "method": method, "suffix": suffix})
        return {"claims_token": token}

    # -- revocation --------------------------------------------------------------------

    def revoke(self, op: str, selector: dict, *, types=TYPES, delay: float = 300.0, until: float | None = None,
               reason: str = "", actor: str = "admin") -> list[dict]:
        """kill | lock | renew | reevaluate. The new entries (published to
        the listeners in this process before returning)."""
        selector = check_selector(selector)
        if isinstance(types, str) or not all(t in TYPES for t in types):
            raise ConfigError(f"token types are some of {', '.join(TYPES)}")
        types = [t for t in TYPES if t in types] or list(TYPES)
        now = self.clock()
        if not 0 <= delay <= MAX_RENEW_DELAY:
            raise ConfigError("a renewal's delay is at most 7 days")
        if until is not None and not now < until <= now + MAX_LOCK:
            raise ConfigError("a lock ends in the future, within 100 years")
        horizon = now + self.cfg.claims_ttl + 120
        where, params = _session_where(selector)
        out = []
        if op in ("kill", "lock"):
            out.append(self.zs.add_revocation("kill", selector, types, now + KILL_SKEW, now, horizon, reason[:512],
                                              actor, end_sessions=(where, params)))
            if op == "lock":
                out.append(self.zs.add_revocation("lock", selector, list(TYPES), now, now,
                                                  until if until is not None else now + MAX_LOCK,
                                                  reason[:512], actor))
        elif op == "renew":
            # Token times are whole seconds: tokens issued from this second on are the renewed ones.
            out.append(self.zs.add_revocation("renew", selector, types, int(now), now + delay, horizon + delay,
                                              reason[:512], actor))
        elif op == "reevaluate":
            out.append(self.zs.add_revocation("reevaluate", selector, [], now, now, now + 60, reason[:512], actor))
        else:
            raise ConfigError(f"unknown revocation operation {op!r}")
        self.publish(out)
        log.warning("revocation", extra={"op": op, "selector": selector, "reason": reason[:128], "actor": actor})
        return out

    def publish(self, entries: list[dict]) -> None:
        for e in entries:
            if not self.view.apply(e):
                self.view.load()
        for fn in self.listeners:
            fn(entries)

    def poll(self) -> list[dict]:
        """Entries other processes appended (`relayd admin revoke`): the
        relay calls this a few times a second; listeners hear them."""
        new = self.view.load()
        if new:
            for fn in self.listeners:
                fn(new)
        return new

    def remove_device(self, device_id: str, reason: str = "device removed", actor: str = "admin") -> int:
        n = self.zs.delete_device(device_id)
        if n:
            self.revoke("kill", {"device": device_id}, reason=reason, actor=actor)
        return n

    def remove_user(self, provider: str, username: str, actor: str = "admin") -> bool:
        """Drop a user (groups and devices too) and kill their sessions;
        False if there was none. A user of an external provider comes back
        at their next sign-in: disable them to keep them out."""
        if not self.zs.delete_user(provider, username):
            return False
        self.revoke("kill", {"user": [provider, username]}, reason="user removed", actor=actor)
        return True

    def set_disabled(self, provider: str, username: str, disabled: bool, actor: str = "admin") -> bool:
        """Disable a user (sign-in refused, sessions killed) or enable them
        again; False if there is no such user."""
        if not self.zs.set_user(provider, username, disabled_at=self.clock() if disabled else None):
            return False
        if disabled:
            self.revoke("kill", {"user": [provider, username]}, reason="user disabled", actor=actor)
        return True

    def reset_user(self, username: str, *, password: str | None = None, totp_off: bool = False,
                   provider: str = LOCAL, actor: str = "admin") -> str | None:
        """A new password or a new (or no) TOTP secret; the sessions the
        old one backed are killed (openziti/ziti#3987's lesson)."""
        fields = {}
        secret = None
        if password is not None:
            if len(password) < 8:
                raise ConfigError("a password has at least 8 characters")
            fields["password_hash"] = self.hasher.hash(password)
        if totp_off:
            fields["totp_secret"] = None
        elif password is None:
            secret = fields["totp_secret"] = totp.new_secret()
        if not self.zs.set_user(provider, username, **fields):
            raise ConfigError(f"no user {username!r} ({provider})")
        self.revoke("kill", {"user": [provider, username]}, reason="credentials changed", actor=actor)
        return secret


def check_local_name(username) -> str:
    if not isinstance(username, str) or not _LOCAL_NAME.match(username):
        raise ConfigError("a user name is 1-64 of a-z 0-9 . _ @ - (lowercase), starting with a letter or digit")
    return username


def normalize_external(name) -> str:
    """An external provider's user name: NFC, no control characters, at
    most 128 characters (compared exactly from then on)."""
    if not isinstance(name, str) or not name:
        raise reject("bad_id_token", "the provider's token names no user")
    name = unicodedata.normalize("NFC", name)
    if len(name) > 128 or any(unicodedata.category(c)[0] == "C" for c in name):
        raise reject("bad_id_token", "the provider's user name is not usable")
    return name


def device_claims(doc) -> dict:
    """The device's own report: a JSON object of at most 8 KiB and depth 4,
    only ever under ``device.*`` (untrusted)."""
    import orjson

    if not isinstance(doc, dict):
        raise reject("bad_device_claims", "device claims must be an object", 400)
    try:
        size = len(orjson.dumps(doc))
    except TypeError:  # orjson.JSONEncodeError: bytes, msgpack extension types, keys that are not strings
        raise reject("bad_device_claims", "device claims must be JSON", 400) from None
    if size > MAX_DEVICE_CLAIMS:
        raise reject("bad_device_claims", "device claims over 8 KiB", 400)

    def depth(v, d=0):
        if d > 4:
            raise reject("bad_device_claims", "device claims nested too deep", 400)
        if isinstance(v, dict):
            for x in v.values():
                depth(x, d + 1)
        elif isinstance(v, list):
            for x in v:
                depth(x, d + 1)

    depth(doc)
    return doc


def check_selector(sel) -> dict:
    """A revocation's selector, typed: ``all: true``, or some of ``sid``,
    ``jti``, ``device``, ``provider``, ``site`` (strings) and ``user``
    ([provider, username])."""
    if not isinstance(sel, dict) or not sel:
        raise ConfigError("a revocation needs a selector (sid, jti, device, user, provider, site or all)")
    allowed = {"sid", "jti", "device", "user", "provider", "site", "all"}
    if set(sel) - allowed:
        raise ConfigError(f"unknown selector {sorted(set(sel) - allowed)[0]!r}")
    if "all" in sel and sel["all"] is not True:
        raise ConfigError("selector all must be true")
    if "user" in sel and (not isinstance(sel["user"], list) or len(sel["user"]) != 2
                          or not all(isinstance(x, str) and 0 < len(x) <= 128 for x in sel["user"])):
        raise ConfigError("selector user is [provider, username]")
    for k in ("sid", "jti", "device", "provider", "site"):
        if k in sel and not (isinstance(sel[k], str) and 0 < len(sel[k]) <= 128):
            raise ConfigError(f"selector {k} is a string of 1 to 128 characters")
    return sel


def _session_where(sel: dict) -> tuple[str, tuple]:
    if sel.get("all"):
        return "1", ()
    parts, params = [], []
    for k, col in (("sid", "sid"), ("device", "device_id"), ("provider", "provider")):
        if k in sel:
            parts.append(f"{col} = ?")
            params.append(sel[k])
    if "user" in sel:
        parts.append("provider = ? AND username = ?")
        params += list(sel["user"])
    if "jti" in sel or "site" in sel or not parts:
        return "0", ()  # a single token or one site's tokens: the session lives on
    return " AND ".join(parts), tuple(params)
