"""Shared access signatures (SAS) as Azure Relay and Service Bus make and
check them, and their connection strings.

A token is ``SharedAccessSignature sr=<SR>&sig=<SIG>&se=<SE>&skn=<RULE>``:
``sr`` the percent-encoded resource URI, ``se`` the expiry (Unix seconds),
``skn`` the name of the rule whose key signed it, ``sig`` the percent-encoded
Base64 of HMAC-SHA256(key, SR + "\\n" + SE) over ``sr`` and ``se`` exactly as
they appear in the token (clients encode the resource differently, and the
signature covers their bytes), with the key string's UTF-8 bytes as the HMAC
key (Azure's keys look like Base64 but are not decoded).

``check`` answers what Azure answers: 401 for a missing, malformed, badly
signed or expired token, 403 for a good token of another resource or without
the right the action needs. ``../shared/specs/hybrid-connections.md``
section 3 is the reference; tests/control/test_sas.py holds its vectors.
The clock is the caller's (``now``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote, unquote, urlsplit

from relayd.errors import AuthError, ConfigError

SCHEME = "SharedAccessSignature"
#: The actions' rights; ``manage`` implies the other two.
RIGHTS = ("listen", "send", "manage")
#: Rules per scope (the node, each hybrid connection), as Azure allows.
MAX_RULES = 12
#: Seconds a token may be past its expiry and still pass (clients renew at
#: the expiry itself): the default of ``[hybrid] clock_skew``.
CLOCK_SKEW = 300.0


class SasError(AuthError):
    """A token refused: ``status`` 401 or 403 and Azure's kind of reason
    (``code``: MissingToken, MalformedToken, InvalidSignature, ExpiredToken,
    InvalidAudience, Unauthorized). The text never quotes the token."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.status = status
        self.code = code


@dataclass(frozen=True)
class SasRule:
    """A shared access rule: a key name, its keys (primary, and the previous
    primary after a rotation) and its rights."""

    name: str
    primary_key: str
    secondary_key: str = ""
    rights: frozenset = frozenset({"listen"})

    def __post_init__(self) -> None:
        check_rule_name(self.name)
        for key in (self.primary_key, self.secondary_key):
            if key and not (16 <= len(key) <= 256 and key.isprintable()):
                raise ConfigError(f"SAS rule {self.name!r}: a key must be 16 to 256 printable characters")
        if not self.primary_key:
            raise ConfigError(f"SAS rule {self.name!r}: no key")
        if not self.rights or not set(self.rights) <= set(RIGHTS):
            raise ConfigError(f"SAS rule {self.name!r}: rights must be some of {', '.join(RIGHTS)}")

    def grants(self, right: str) -> bool:
        return right in self.rights or "manage" in self.rights


def check_rule_name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 256 or not all(
            c.isalnum() or c in "-._" for c in name):
        raise ConfigError(f"SAS rule name {str(name)[:60]!r}: 1 to 256 letters, digits, '-', '.' or '_'")
    return name


def new_key() -> str:
    """A fresh key as Azure makes them: 32 random bytes in Base64 (44 characters)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def parse_rights(text) -> frozenset:
    """``"listen,send"`` or a list of names -> the set of rights."""
    items = text.split(",") if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)) or not items:
        raise ConfigError("rights: expected some of listen, send, manage")
    out = set()
    for item in items:
        right = str(item).strip().lower()
        if right not in RIGHTS:
            raise ConfigError(f"rights: {str(item)[:30]!r} is not listen, send or manage")
        out.add(right)
    return frozenset(out)


def _signature(key: str, sr: str, se: str) -> str:
    mac = hmac.new(key.encode("utf-8"), (sr + "\n" + se).encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


def make_token(resource: str, rule: str, key: str, expiry: int) -> str:
    """A token for ``resource`` (a URI such as ``http://ns/path``) signed with
    ``key`` of rule ``rule``, valid until ``expiry`` (Unix seconds)."""
    sr = quote(resource, safe="")
    se = str(int(expiry))
    sig = quote(_signature(key, sr, se), safe="")
    return f"{SCHEME} sr={sr}&sig={sig}&se={se}&skn={quote(rule, safe='')}"


@dataclass(frozen=True)
class Token:
    """A token's fields: ``sr`` and ``se`` as they appear (still encoded)."""

    sr: str
    sig: str
    se: str
    skn: str

    @property
    def expiry(self) -> int:
        return int(self.se)

    @property
    def scope(self) -> tuple[str, str]:
        """(host in lower case, path without a leading ``/$hc`` and without
        slashes at the ends) of the resource the token is for."""
        url = urlsplit(unquote(self.sr))
        host = (url.hostname or "").lower()
        path = url.path.strip("/")
        if path.lower() == "$hc" or path.lower().startswith("$hc/"):
            path = path[3:].lstrip("/")
        return host, path


def parse_token(text) -> Token:
    """A token's text -> its fields; SasError(401, MalformedToken) if it is
    not one."""
    if not isinstance(text, str) or len(text) > 4096:
        raise SasError(401, "MalformedToken", "the token is not a shared access signature")
    scheme, _, rest = text.strip().partition(" ")
    if scheme != SCHEME:
        raise SasError(401, "MalformedToken", "the token is not a shared access signature")
    fields = {}
    for part in rest.strip().split("&"):
        name, eq, value = part.partition("=")
        if not eq or name in fields:
            raise SasError(401, "MalformedToken", "the token's fields are not name=value pairs, each once")
        fields[name] = value
    try:
        tok = Token(fields["sr"], unquote(fields["sig"]).replace(" ", "+"), fields["se"], unquote(fields["skn"]))
    except KeyError:
        raise SasError(401, "MalformedToken", "the token needs sr, sig, se and skn") from None
    if not tok.se.isdigit() or len(tok.se) > 12 or not tok.sr or not tok.skn:
        raise SasError(401, "MalformedToken", "the token's expiry or resource is malformed")
    return tok


def check(text, rules, namespaces, path: str, right: str, now: float, skew: float = CLOCK_SKEW) -> Token:
    """The token ``text`` if it lets its holder do ``right`` on the entity at
    ``path`` (as registered, ``a/b``) of a node called by one of
    ``namespaces`` (host names, lower case), checked with ``rules`` (the
    node's and the entity's SasRule); SasError otherwise."""
    if not text:
        raise SasError(401, "MissingToken", "a relay security token is required")
    tok = parse_token(text)
    rule = next((r for r in rules if r.name == tok.skn), None)
    good = False
    if rule is not None:
        for key in (rule.primary_key, rule.secondary_key):
            if key and hmac.compare_digest(_signature(key, tok.sr, tok.se).encode(), tok.sig.encode("utf-8",
                                                                                                      "replace")):
                good = True
    if not good:
        raise SasError(401, "InvalidSignature", "the token has an invalid signature")
    if tok.expiry + skew < now:
        when = datetime.fromtimestamp(tok.expiry, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        raise SasError(401, "ExpiredToken", f"the token expired at {when}")
    host, scope = tok.scope
    entity = path.strip("/").lower()
    scope = scope.lower()
    if host not in namespaces or (scope and entity != scope and not entity.startswith(scope + "/")):
        raise SasError(403, "InvalidAudience", "the token is not valid for this resource")
    if not rule.grants(right):
        raise SasError(403, "Unauthorized", f"'{right.capitalize()}' claim(s) are required to perform this "
                                            "operation")
    return tok


# -- connection strings --------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectionString:
    """``Endpoint=sb://HOST[:PORT]/;SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=...``
    as Azure's portal writes it (or with ``SharedAccessSignature=`` instead of
    a key)."""

    endpoint: str  # sb://host[:port]/
    key_name: str = ""
    key: str = ""
    entity_path: str = ""
    signature: str = ""

    def __str__(self) -> str:
        parts = [f"Endpoint={self.endpoint}"]
        if self.signature:
            parts.append(f"SharedAccessSignature={self.signature}")
        else:
            parts += [f"SharedAccessKeyName={self.key_name}", f"SharedAccessKey={self.key}"]
        if self.entity_path:
            parts.append(f"EntityPath={self.entity_path}")
        return ";".join(parts)

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 443


_CS_KEYS = {"endpoint": "endpoint", "sharedaccesskeyname": "key_name", "sharedaccesskey": "key",
            "entitypath": "entity_path", "sharedaccesssignature": "signature"}


def parse_connection_string(text: str) -> ConnectionString:
    """A connection string -> its parts; ConfigError naming what is wrong
    (never quoting the key)."""
    fields = {}
    for part in str(text).strip().strip(";").split(";"):
        name, eq, value = part.partition("=")
        key = _CS_KEYS.get(name.strip().lower())
        if not eq or key is None:
            if name.strip().lower() in ("operationtimeout", "authentication"):
                continue  # .NET-only settings
            raise ConfigError(f"connection string: unknown part {name.strip()[:40]!r}")
        fields[key] = value.strip()
    cs = ConnectionString(**fields)
    if not cs.endpoint.startswith("sb://") or not cs.host:
        raise ConfigError("connection string: Endpoint must be sb://HOST/")
    if not cs.signature and not (cs.key_name and cs.key):
        raise ConfigError("connection string: needs SharedAccessKeyName and SharedAccessKey, "
                          "or SharedAccessSignature")
    return cs
