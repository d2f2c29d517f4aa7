"""Hybrid connections (Azure Relay's entities) and their shared access rules:
the model and the catalog a node serves.

A hybrid connection is a registered path (``orders``, ``a/b/c``) with its
options and rules; the node has rules of its own that hold for every path.
They come from two places that must agree: the ``[hybrid]`` tables of the
relay's config (relayd.config) and the data directory, managed with
``relayd admin hc ...`` (relayd.control.store). ``Catalog.merged`` makes one
catalog of both; a path in both is the config's.

Lookups are case-insensitive, and a request path belongs to the longest
registered prefix of whole segments (``a/b`` takes ``a/b/x``, never
``a/bx``); the rest is the suffix the listener sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from relayd.control.sas import MAX_RULES, SasRule
from relayd.errors import ConfigError

#: An entity path: segments of letters, digits, '-', '.', '_', joined by '/'
#: (Azure allows up to 260 characters).
_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*\Z")
#: Azure's defaults: listeners per entity, the listener's response deadline
#: in HTTP mode, and the largest body carried on the control channel.
MAX_LISTENERS = 25
RESPONSE_TIMEOUT = 60.0
CONTROL_THRESHOLD = 64 * 1024


#: Paths of the relay's own services on its names (relayd.control.api, relayd.control.console).
_RESERVED = ("api/v1", "console")


def check_path(path: str) -> str:
    """A hybrid connection's path, without slashes at the ends."""
    p = str(path).strip("/") if isinstance(path, str) else ""
    if not p or len(p) > 260 or not _PATH.match(p) or p.lower() == "$hc" or p.lower().startswith("$hc/") \
            or p.startswith(".relayd"):
        raise ConfigError(f"hybrid connection path {str(path)[:80]!r}: segments of letters, digits, '-', '.' "
                          "and '_' joined by '/', at most 260 characters")
    low = p.lower()
    for r in _RESERVED:
        if low == r or low.startswith(r + "/"):
            # On the relay's own names these are the relay's: an HTTP-mode
            # hybrid connection there would take the admin API's requests
            # (and the console's session cookie) or the console's pages.
            raise ConfigError(f"hybrid connection path {p[:80]!r}: /{r} is the relay's own (its API and web "
                              "console)")
    return p


@dataclass(frozen=True)
class HybridConnection:
    """One hybrid connection and its options."""

    path: str
    #: Senders need a token with the Send right (false: anyone may send).
    requires_client_auth: bool = True
    #: Senders may open WebSockets (``sb-hc-action=connect``).
    websocket: bool = True
    #: Plain HTTPS requests to ``/{path}/...`` are delivered to listeners.
    http: bool = True
    #: Seconds a listener has to answer an HTTP-mode request (Azure: 60).
    response_timeout: float = RESPONSE_TIMEOUT
    #: Bodies up to this many bytes travel on the control channel; larger
    #: ones over a rendezvous WebSocket (Azure: 64 KiB).
    control_threshold: int = CONTROL_THRESHOLD
    #: Listeners at once (Azure: 25).
    max_listeners: int = MAX_LISTENERS
    rules: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", check_path(self.path))
        where = f"hybrid connection {self.path!r}"
        if not 0 < self.response_timeout <= 3600:
            raise ConfigError(f"{where}: response_timeout must be between 0 and 3600 seconds")
        if not 1024 <= self.control_threshold <= 64 * 1024:
            raise ConfigError(f"{where}: control_threshold must be between 1024 and 65536 bytes")
        if not 1 <= self.max_listeners <= 1000:
            raise ConfigError(f"{where}: max_listeners must be between 1 and 1000")
        check_rules(self.rules, where)

    @property
    def key(self) -> str:
        return self.path.lower()


def check_rules(rules, where: str) -> tuple:
    rules = tuple(rules)
    if len(rules) > MAX_RULES:
        raise ConfigError(f"{where}: at most {MAX_RULES} shared access rules")
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two shared access rules with one name")
    return rules


@dataclass(frozen=True)
class Catalog:
    """The hybrid connections a node serves, and the node's own rules."""

    connections: dict = field(default_factory=dict)  # lower-case path -> HybridConnection
    rules: tuple = ()  # node scope

    def __post_init__(self) -> None:
        check_rules(self.rules, "the node")

    @classmethod
    def of(cls, connections, rules=()) -> "Catalog":
        out: dict = {}
        for hc in connections:
            if hc.key in out:
                raise ConfigError(f"hybrid connection {hc.path!r} is defined twice")
            out[hc.key] = hc
        return cls(out, tuple(rules))

    @classmethod
    def merged(cls, config: "Catalog", stored: "Catalog") -> "Catalog":
        """The config's catalog with the data directory's: a path or a node
        rule in both is the config's."""
        connections = {**stored.connections, **config.connections}
        names = {r.name for r in config.rules}
        rules = config.rules + tuple(r for r in stored.rules if r.name not in names)
        return cls(connections, check_rules(rules, "the node (config and data directory together)"))

    def find(self, path: str) -> tuple[HybridConnection, str] | None:
        """The hybrid connection whose path is the longest prefix of whole
        segments of ``path``, and the rest (the suffix, without a leading
        slash); None when no prefix is registered."""
        segments = path.strip("/").split("/")
        for n in range(len(segments), 0, -1):
            hc = self.connections.get("/".join(segments[:n]).lower())
            if hc is not None:
                return hc, "/".join(segments[n:])
        return None

    def rules_for(self, hc: HybridConnection) -> list[SasRule]:
        """The rules a token for ``hc`` may be signed with: the node's and its own."""
        return list(self.rules) + list(hc.rules)

    def with_connection(self, hc: HybridConnection) -> "Catalog":
        return replace(self, connections={**self.connections, hc.key: hc})
