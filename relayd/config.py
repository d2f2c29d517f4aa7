"""Configuration of ``relayd serve`` and ``relayd agent``: a TOML file and
flags, flags winning. Everything a flag can say the file can say too.

    [serve]
    data = "/var/lib/relayd"
    agents = "0.0.0.0:7000"          # where agents dial in (TLS)
    public = "relay.example.com:7000" # agent address written into join tokens
    hostname = "relay.example.com"    # name on the relay's TLS certificate
    metrics = "127.0.0.1:9100"
    grace = "0s"                      # hold public connections while no agent
    drain = "10s"                     # on stop: GoAway, open streams may finish
    agent_cert_ttl = "30d"
    [serve.tcp]
    web = "0.0.0.0:8080"              # endpoint name = public TCP listener

    [agent]
    data = "/var/lib/relayd-agent"
    join = "relayd1...."              # only needed once
    transport = "tls"
    reconnect_max = "30s"
    connect_timeout = "10s"
    drain = "10s"                     # on stop: GoAway, open streams may finish
    [agent.endpoints]
    web = "127.0.0.1:80"

    [mux]                             # relayd.core.config.MuxConfig
    max_window = 16777216
    ping_interval = "10s"

    [http]                            # relayd.core.http1.HttpLimits (relay): every HTTP/1 head,
    max_head = 32768                  # the HTTPS port's connections
    idle_timeout = "60s"

    [websocket]                       # relayd.core.wsconfig.WsConfig: the agent link over WSS
    max_message = 16777216            # (relay and agent side)
    close_timeout = "10s"

    [admission]                       # relayd.core.config.AdmissionConfig (relay)
    max_unauthenticated = 1024
    max_unauthenticated_per_source = 64
    handshake_timeout = "10s"
    preamble_timeout = "10s"

    [splice]                          # relayd.core.config.SpliceConfig: TCP clients and services
    max_pending = 4194304

    [hybrid]                          # Azure Relay hybrid connections (relay; docs/hybrid.md)
    clock_skew = "5m"                 # a SAS token may be this far past its expiry
    [[hybrid.rules]]                  # node scope: valid for every hybrid connection
    name = "RootManageSharedAccessKey"
    key = "c2VjcmV0..."
    rights = ["listen", "send", "manage"]
    [[hybrid.connections]]
    path = "orders"
    requires_client_auth = true       # also: websocket, http (true), response_timeout ("60s"),
    rules = [{ name = "orders-listen", key = "...", rights = ["listen"] }]   # control_threshold, max_listeners

    [acme]                            # certificates by ACME for the HTTPS port (relay; docs/acme.md)
    directory = "https://acme-v02.api.letsencrypt.org/directory"
    email = "ops@example.com"
    challenge = "http-01"             # or "tls-alpn-01" (on the HTTPS port, which must be port 443)
    http_listen = "0.0.0.0:80"        # http-01: answers the CA, redirects the rest to HTTPS
    renew_before = "30d"              # default: a third of the lifetime before expiry

    [log]
    level = "info"

A malformed or contradictory file fails at start with a ConfigError naming
the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from relayd.core.config import SPLICE, AdmissionConfig, MuxConfig, SpliceConfig
from relayd.core.http1 import HttpLimits
from relayd.core.wsconfig import AGENT_LINK, WsConfig
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.control.sas import CLOCK_SKEW, SasRule, parse_rights
from relayd.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")


def parse_duration(value, key: str = "duration") -> float:
    """'30s', '15m', '2h', '7d', '1h30m', '250ms' or a number of seconds;
    finite and not negative. Units are lower case (no 'M' that could be
    minutes or months); nothing else is accepted (no '1e3', 'inf', '1_000')."""
    if isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected a duration like '15m', got {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a float's range: no duration either
            seconds = math.inf
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if _PLAIN_NUMBER.match(text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text):
                raise ConfigError(f"config key '{key}': {value!r} is not a duration like '15m'")
    else:
        raise ConfigError(f"config key '{key}': expected a duration like '15m', got {value!r}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"config key '{key}': a duration must be finite and not negative")
    return seconds


def parse_hostport(value, key: str, *, need_host: bool = False) -> tuple[str, int]:
    """'host:port', '[v6addr]:port' or ':port' (all interfaces; not with
    ``need_host``, for addresses to dial). The host comes back without
    brackets; an IPv6 address must be bracketed; port 0 is accepted (bind to
    an ephemeral port)."""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"config key '{key}': expected HOST:PORT, got {str(value)[:100]!r}")
    shown = value[:100]
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end], value[end + 1:]
        if end < 0 or not rest.startswith(":"):
            raise ConfigError(f"config key '{key}': {shown!r} is not [IPv6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"config key '{key}': {host!r} is not an IPv6 address") from None
        port_s = rest[1:]
    else:
        host, _, port_s = value.rpartition(":")
        if ":" in host:
            raise ConfigError(f"config key '{key}': write an IPv6 address as [addr]:port, not {shown!r}")
        if host and (not _HOSTNAME.match(host) or ".." in host):
            raise ConfigError(f"config key '{key}': bad host name in {shown!r}")
        if not host:
            if need_host:
                raise ConfigError(f"config key '{key}': {shown!r} names no host")
            host = "0.0.0.0"
    if not _PORT.match(port_s) or int(port_s) > 65535:
        raise ConfigError(f"config key '{key}': port in {shown!r} must be 0-65535")
    return host, int(port_s)


def format_hostport(hp: tuple[str, int]) -> str:
    host, port = hp
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_name(name: str, key: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"config key '{key}': endpoint name {name!r} must be 1-63 of A-Z a-z 0-9 _ . -")
    return name


@dataclass
class ServeConfig:
    data: Path = Path("relayd-data")
    agents: tuple[str, int] = ("0.0.0.0", 7000)
    public: tuple[str, int] | None = None
    hostname: str | None = None
    metrics: tuple[str, int] | None = None
    https: tuple[str, int] | None = None
    #: User-supplied certificates for the HTTPS port (full chain PEM, key PEM),
    #: chosen by SNI; the relay's own certificate answers every other name.
    certs: list[tuple[Path, Path]] = field(default_factory=list)
    grace: float = 0.0
    agent_cert_ttl: float = 30 * 86400.0
    tcp: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: HTTP endpoints on the HTTPS port: NAME -> "HOSTNAME[/PREFIX]"
    http: dict[str, str] = field(default_factory=dict)
    gateway_timeout: float = 60.0
    #: On SIGTERM/SIGINT: seconds open streams may finish after GoAway.
    drain: float = 10.0
    mux: MuxConfig = field(default_factory=MuxConfig)
    #: the agent link's WebSocket over WSS ([websocket])
    websocket: WsConfig = AGENT_LINK
    #: TCP splices ([splice])
    splice: SpliceConfig = SPLICE
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    #: [hybrid]: the hybrid connections and node rules of the config
    #: (relayd.control.hybrid.Catalog; the data directory's are added at start)
    hybrid: Catalog = field(default_factory=Catalog)
    #: [hybrid] clock_skew: seconds a SAS token may be past its expiry
    hybrid_clock_skew: float = CLOCK_SKEW
    #: [zerotrust]: the controller and this relay's gateway (relayd.control.zerotrust.ZtConfig)
    zerotrust: object = None
    #: The networks OTPs are issued to (relayd.control.provisioning); empty: any.
    admin_allow: list = field(default_factory=list)
    #: The event bus shared by relays (relayd.control.redisbus): a redis://
    #: or rediss:// URL; None: events stay in this process.
    redis: str | None = None
    #: Seconds a device's presence key lives without a refresh.
    redis_presence_ttl: float = 30.0
    #: [acme]: certificates for the HTTPS port's names (relayd.control.acme.AcmeConfig)
    acme: object = None
    log_level: str = "info"

    @property
    def endpoints(self) -> set[str]:
        """Endpoint names agents may serve: the TCP and HTTP endpoints, and
        ``site:<id>`` when this relay is a zero-trust site's gateway."""
        site = {f"site:{self.zerotrust.site}"} if self.zerotrust is not None and self.zerotrust.site else set()
        return set(self.tcp) | set(self.http) | site

    @property
    def advertised_https(self) -> tuple[str, int] | None:
        """The HTTPS address agents dial for a WebSocket link (--transport wss)."""
        if self.https is None:
            return None
        host, port = self.https
        if self.public is not None:
            host = self.public[0]
        elif host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if host != "::" else "::1"
        return host, port

    @property
    def advertised(self) -> tuple[str, int]:
        """The agent address written into join tokens."""
        if self.public is not None:
            return self.public
        host, port = self.agents
        return ("127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host), port

    def validate(self) -> "ServeConfig":
        seen = {self.agents: "serve.agents"}
        if self.https is not None:
            if self.https == self.agents and self.https[1] != 0:
                raise ConfigError("config keys 'serve.https' and 'serve.agents' use the same address")
            seen[self.https] = "serve.https"
        if self.metrics is not None:
            seen.setdefault(self.metrics, "serve.metrics")
            if seen[self.metrics] != "serve.metrics":
                raise ConfigError("config keys 'serve.metrics' and 'serve.agents' use the same address")
        for name, hp in self.tcp.items():
            key = f"serve.tcp.{name}"
            if hp[1] != 0 and hp in seen:
                raise ConfigError(f"config keys '{seen[hp]}' and '{key}' both listen on {format_hostport(hp)}")
            seen[hp] = key
        if self.http and self.https is None:
            raise ConfigError("config key 'serve.http': HTTP endpoints need the HTTPS port; set serve.https")
        for name, route in self.http.items():
            if name in self.tcp:
                raise ConfigError(f"config keys 'serve.tcp.{name}' and 'serve.http.{name}': one name, two endpoints")
            host = route.split("/", 1)[0]
            if not host or any(c.isspace() for c in route):
                raise ConfigError(f"config key 'serve.http.{name}': expected HOSTNAME[/PREFIX], got {route!r}")
        if self.acme is not None and self.https is None:
            raise ConfigError("config table 'acme': certificates are for the HTTPS port; set serve.https")
        if self.certs and self.https is None:
            raise ConfigError("config key 'serve.certs': certificates are for the HTTPS port; set serve.https")
        for i, (cert, key) in enumerate(self.certs):
            for what, path in (("cert", cert), ("key", key)):
                if not Path(path).is_file():
                    raise ConfigError(f"config key 'serve.certs[{i}].{what}': {path} is not a readable file")
        if self.agent_cert_ttl < 5:
            raise ConfigError("config key 'serve.agent_cert_ttl': must be at least 5s")
        if self.grace > 60:
            raise ConfigError("config key 'serve.grace': at most 60s (clients should not hang)")
        return self


@dataclass(frozen=True)
class BackendTLS:
    """TLS from the agent to an endpoint's service (Kaazing's "truststore"):
    verified against ``ca`` only, optionally presenting a client certificate."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # default: the target's host

    def context(self):
        from relayd.net import tls

        return tls.client_context(str(self.ca), cert_file=str(self.cert) if self.cert else None,
                                  key_file=str(self.key) if self.key else None)


@dataclass
class AgentConfig:
    data: Path = Path("relayd-agent")
    join: str | None = None
    endpoints: dict[str, tuple[str, int]] = field(default_factory=dict)
    backend_tls: dict[str, BackendTLS] = field(default_factory=dict)
    transport: str = "tls"
    proxy: str | None = None
    reconnect_max: float = 30.0
    #: Seconds for each step of reaching the relay (TCP, proxy CONNECT, TLS,
    #: the preamble's reply) and for a service to accept a stream's dial.
    connect_timeout: float = 10.0
    #: On SIGTERM/SIGINT: seconds open streams may finish after GoAway.
    drain: float = 10.0
    mux: MuxConfig = field(default_factory=MuxConfig)
    #: the agent link's WebSocket over WSS ([websocket])
    websocket: WsConfig = AGENT_LINK
    #: TCP splices ([splice])
    splice: SpliceConfig = SPLICE
    #: The zero-trust site this agent reaches services of, and the networks
    #: it may dial for that site's users (its second line: the gateway's
    #: filter decides first).
    site: str | None = None
    site_networks: list = field(default_factory=list)
    #: The TUN device that carries the site's share of TUN-mode packets
    #: (made on the first packet stream; needs CAP_NET_ADMIN)
    site_tun: str = "relayd-site"
    #: Where the local forwarder of the device API listens (a loopback
    #: address; relayd.agent.deviceapi), or None.
    device_api: tuple[str, int] | None = None
    #: Device enrollment over EST (relayd.agent.est): the OTP, the relay's
    #: EST base (https://HOST[:PORT]) and the CA pin that came with the OTP.
    otp: str | None = None
    est: str | None = None
    pin: str | None = None
    log_level: str = "info"

    def validate(self) -> "AgentConfig":
        if self.site is not None and not self.site_networks:
            raise ConfigError("config key 'agent.site_networks': a site agent needs the networks it may reach")
        for name, b in self.backend_tls.items():
            key = f"agent.endpoints.{name}"
            if name not in self.endpoints:
                raise ConfigError(f"config key '{key}': TLS settings for an endpoint without a target")
            for what, path in (("ca", b.ca), ("cert", b.cert), ("key", b.key)):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"config key '{key}.{what}': {path} is not a readable file")
            if (b.cert is None) != (b.key is None):
                raise ConfigError(f"config key '{key}': cert and key go together")
            try:
                b.context()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"config key '{key}': cannot load the TLS files ({exc})") from None
        if self.transport not in ("tls", "wss", "auto"):
            raise ConfigError(f"config key 'agent.transport': must be tls, wss or auto, not {self.transport!r}")
        if self.proxy is not None:
            from relayd.net.proxy import parse_proxy_url

            parse_proxy_url(self.proxy, "agent.proxy")
        if not 1 <= self.reconnect_max <= 3600:
            raise ConfigError("config key 'agent.reconnect_max': must be between 1s and 1h")
        if not 0.5 <= self.connect_timeout <= 300:
            raise ConfigError("config key 'agent.connect_timeout': must be between 0.5s and 5m")
        if (self.otp is None) != (self.est is None):
            raise ConfigError("config keys 'agent.otp' and 'agent.est' go together (--otp OTP --est https://HOST)")
        if self.otp is not None and self.join is not None:
            raise ConfigError("enroll with a join token (--join) or an OTP over EST (--otp, --est), not both")
        if self.device_api is not None and self.device_api[0] not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError("config key 'agent.device_api': a loopback address (127.0.0.1:PORT): "
                              "whoever reaches it speaks as this device")
        return self


_SERVE_KEYS = {"data", "agents", "public", "hostname", "metrics", "https", "certs", "grace", "agent_cert_ttl", "tcp",
               "http", "gateway_timeout", "drain", "admin_allow", "redis", "redis_presence_ttl"}
_AGENT_KEYS = {"data", "join", "transport", "proxy", "reconnect_max", "connect_timeout", "endpoints", "drain", "site",
               "site_networks", "site_tun", "device_api", "otp", "est", "pin"}
_DURATION_MUX = {"ping_interval", "ping_timeout", "open_timeout", "window_idle"}


def _load_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _known(table, allowed: set[str], prefix: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"config key '{prefix}': expected a table")
    for k in table:
        if k not in allowed:
            raise ConfigError(f"config key '{prefix}.{k}' is not known (expected one of: {', '.join(sorted(allowed))})")
    return table


def check_redis_url(value, key: str) -> str:
    """A redis://, rediss:// or unix:// URL (the Redis event bus)."""
    if not isinstance(value, str) or not re.match(r"(rediss?|unix)://\S+\Z", value):
        raise ConfigError(f"config key '{key}': a redis://HOST:PORT[/DB] (or rediss://, unix://) URL")
    return value


def _str(value, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"config key '{key}': expected a non-empty string, got {value!r}")
    return value


def _limits(table, cls, prefix: str, durations: set[str]):
    """A table of limits -> the frozen config object ``cls`` (MuxConfig,
    AdmissionConfig): integers, or durations for the timers."""
    fields = {f.name for f in dataclasses.fields(cls)}
    table = _known(table, fields, prefix)
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{k}"
        if k in durations:
            kwargs[k] = parse_duration(v, key)
        elif isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {v!r}")
        else:
            kwargs[k] = v
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"config key {exc}") from None


def _mux(table) -> MuxConfig:
    return _limits(table, MuxConfig, "mux", _DURATION_MUX)


def _common(doc: dict, cfg) -> None:
    top = _known(doc, {"serve", "agent", "mux", "admission", "http", "websocket", "splice", "hybrid", "zerotrust",
                       "acme", "log"},
                 "<top>") if doc else {}
    if "splice" in top:
        cfg.splice = _limits(top["splice"], SpliceConfig, "splice", set())
    if "mux" in top:
        cfg.mux = _mux(top["mux"])
    if "websocket" in top:
        # Keys not given keep the agent link's values, not WsConfig's defaults.
        given = _limits(top["websocket"], WsConfig, "websocket", {"close_timeout"})
        try:
            cfg.websocket = dataclasses.replace(AGENT_LINK, **{k: getattr(given, k) for k in top["websocket"]})
        except ConfigError as exc:
            raise ConfigError(f"config key {exc}") from None
    if "log" in top:
        lg = _known(top["log"], {"level"}, "log")
        if "level" in lg:
            level = _str(lg["level"], "log.level").lower()
            if level not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"config key 'log.level': {level!r} is not debug, info, warning or error")
            cfg.log_level = level


def _sas_rule(t, key: str) -> SasRule:
    t = _known(t, {"name", "key", "secondary_key", "rights"}, key)
    if "name" not in t or "key" not in t or "rights" not in t:
        raise ConfigError(f"config key '{key}': needs name, key and rights")
    try:
        return SasRule(_str(t["name"], f"{key}.name"), _str(t["key"], f"{key}.key"),
                       _str(t["secondary_key"], f"{key}.secondary_key") if "secondary_key" in t else "",
                       parse_rights(t["rights"]))
    except ConfigError as exc:
        raise ConfigError(f"config key '{key}': {exc}") from None


def _hybrid(table) -> tuple[Catalog, float]:
    h = _known(table, {"rules", "connections", "clock_skew"}, "hybrid")
    skew = CLOCK_SKEW
    if "clock_skew" in h:
        skew = parse_duration(h["clock_skew"], "hybrid.clock_skew")
        if not 0 <= skew <= 3600:
            raise ConfigError("config key 'hybrid.clock_skew': must be between 0s and 1h")
    for k in ("rules", "connections"):
        if not isinstance(h.get(k, []), list):
            raise ConfigError(f"config key 'hybrid.{k}': expected [[hybrid.{k}]] tables")
    rules = [_sas_rule(t, f"hybrid.rules[{i}]") for i, t in enumerate(h.get("rules", []))]
    connections = []
    for i, t in enumerate(h.get("connections", [])):
        key = f"hybrid.connections[{i}]"
        t = _known(t, {"path", "requires_client_auth", "websocket", "http", "response_timeout",
                       "control_threshold", "max_listeners", "rules"}, key)
        if "path" not in t:
            raise ConfigError(f"config key '{key}': needs a path")
        opts: dict = {}
        for flag in ("requires_client_auth", "websocket", "http"):
            if flag in t:
                if not isinstance(t[flag], bool):
                    raise ConfigError(f"config key '{key}.{flag}': expected true or false")
                opts[flag] = t[flag]
        if "response_timeout" in t:
            opts["response_timeout"] = parse_duration(t["response_timeout"], f"{key}.response_timeout")
        for n in ("control_threshold", "max_listeners"):
            if n in t:
                if isinstance(t[n], bool) or not isinstance(t[n], int):
                    raise ConfigError(f"config key '{key}.{n}': expected an integer")
                opts[n] = t[n]
        if not isinstance(t.get("rules", []), list):
            raise ConfigError(f"config key '{key}.rules': expected a list of {{ name, key, rights }}")
        opts["rules"] = tuple(_sas_rule(r, f"{key}.rules[{j}]") for j, r in enumerate(t.get("rules", [])))
        try:
            connections.append(HybridConnection(_str(t["path"], f"{key}.path"), **opts))
        except ConfigError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from None
    try:
        return Catalog.of(connections, rules), skew
    except ConfigError as exc:
        raise ConfigError(f"config key 'hybrid': {exc}") from None


def load_serve(path: Path | None) -> ServeConfig:
    cfg = ServeConfig()
    if path is None:
        return cfg
    doc = _load_toml(path)
    _common(doc, cfg)
    if "admission" in doc:
        cfg.admission = _limits(doc["admission"], AdmissionConfig, "admission",
                                {"handshake_timeout", "preamble_timeout"})
    if "http" in doc:
        cfg.http_limits = _limits(doc["http"], HttpLimits, "http", {"head_timeout", "idle_timeout"})
    if "hybrid" in doc:
        cfg.hybrid, cfg.hybrid_clock_skew = _hybrid(doc["hybrid"])
    if "zerotrust" in doc:
        cfg.zerotrust = _zerotrust(doc["zerotrust"])
    if "acme" in doc:
        cfg.acme = _acme(doc["acme"])
    s = _known(doc.get("serve", {}), _SERVE_KEYS, "serve")
    if "data" in s:
        cfg.data = Path(_str(s["data"], "serve.data"))
    for k in ("agents", "public", "metrics", "https"):
        if k in s:
            setattr(cfg, k, parse_hostport(s[k], f"serve.{k}"))
    if "hostname" in s:
        cfg.hostname = _str(s["hostname"], "serve.hostname")
    if "redis" in s:
        cfg.redis = check_redis_url(s["redis"], "serve.redis")
    if "redis_presence_ttl" in s:
        cfg.redis_presence_ttl = parse_duration(s["redis_presence_ttl"], "serve.redis_presence_ttl")
        if not 1 <= cfg.redis_presence_ttl <= 3600:
            raise ConfigError("config key 'serve.redis_presence_ttl': between 1s and 1h")
    if "grace" in s:
        cfg.grace = parse_duration(s["grace"], "serve.grace")
    if "agent_cert_ttl" in s:
        cfg.agent_cert_ttl = parse_duration(s["agent_cert_ttl"], "serve.agent_cert_ttl")
    certs = s.get("certs", [])
    if not isinstance(certs, list):
        raise ConfigError("config key 'serve.certs': expected [[serve.certs]] tables with cert and key")
    for i, c in enumerate(certs):
        key = f"serve.certs[{i}]"
        c = _known(c, {"cert", "key"}, key)
        if "cert" not in c or "key" not in c:
            raise ConfigError(f"config key '{key}': needs cert and key")
        cfg.certs.append((Path(_str(c["cert"], f"{key}.cert")), Path(_str(c["key"], f"{key}.key"))))
    http = s.get("http", {})
    if not isinstance(http, dict):
        raise ConfigError("config key 'serve.http': expected a table of NAME = \"HOSTNAME[/PREFIX]\"")
    for name, v in http.items():
        cfg.http[_check_name(name, f"serve.http.{name}")] = _str(v, f"serve.http.{name}")
    if "gateway_timeout" in s:
        cfg.gateway_timeout = parse_duration(s["gateway_timeout"], "serve.gateway_timeout")
    if "drain" in s:
        cfg.drain = parse_duration(s["drain"], "serve.drain")
    if "admin_allow" in s:
        cfg.admin_allow = parse_networks(s["admin_allow"], "serve.admin_allow")
    tcp = s.get("tcp", {})
    if not isinstance(tcp, dict):
        raise ConfigError("config key 'serve.tcp': expected a table of NAME = \"HOST:PORT\"")
    for name, v in tcp.items():
        cfg.tcp[_check_name(name, f"serve.tcp.{name}")] = parse_hostport(v, f"serve.tcp.{name}")
    return cfg


def load_agent(path: Path | None) -> AgentConfig:
    cfg = AgentConfig()
    if path is None:
        return cfg
    doc = _load_toml(path)
    _common(doc, cfg)
    a = _known(doc.get("agent", {}), _AGENT_KEYS, "agent")
    if "data" in a:
        cfg.data = Path(_str(a["data"], "agent.data"))
    if "join" in a:
        cfg.join = _str(a["join"], "agent.join")
    if "transport" in a:
        cfg.transport = _str(a["transport"], "agent.transport")
    if "proxy" in a:
        cfg.proxy = _str(a["proxy"], "agent.proxy")
    if "reconnect_max" in a:
        cfg.reconnect_max = parse_duration(a["reconnect_max"], "agent.reconnect_max")
    if "connect_timeout" in a:
        cfg.connect_timeout = parse_duration(a["connect_timeout"], "agent.connect_timeout")
    if "drain" in a:
        cfg.drain = parse_duration(a["drain"], "agent.drain")
    if "site" in a:
        cfg.site = _check_name(_str(a["site"], "agent.site"), "agent.site")
    if "site_networks" in a:
        cfg.site_networks = parse_networks(a["site_networks"], "agent.site_networks")
    if "site_tun" in a:
        cfg.site_tun = _str(a["site_tun"], "agent.site_tun")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", cfg.site_tun):
            raise ConfigError("config key 'agent.site_tun': a network device name of 1 to 15 letters, digits, . _ -")
    if "device_api" in a:
        cfg.device_api = parse_hostport(a["device_api"], "agent.device_api", need_host=True)
    for k in ("otp", "est", "pin"):
        if k in a:
            setattr(cfg, k, _str(a[k], f"agent.{k}"))
    eps = a.get("endpoints", {})
    if not isinstance(eps, dict):
        raise ConfigError("config key 'agent.endpoints': expected a table of NAME = \"HOST:PORT\"")
    for name, v in eps.items():
        key = f"agent.endpoints.{name}"
        _check_name(name, key)
        if isinstance(v, dict):
            # [agent.endpoints.NAME] target = "HOST:PORT", tls = true, ca = ..., cert/key, server_name
            t = _known(v, {"target", "tls", "ca", "cert", "key", "server_name"}, key)
            if "target" not in t:
                raise ConfigError(f"config key '{key}.target' is required")
            cfg.endpoints[name] = parse_hostport(t["target"], f"{key}.target")
            if t.get("tls", False) is not False:
                if t["tls"] is not True:
                    raise ConfigError(f"config key '{key}.tls': expected true or false")
                if "ca" not in t:
                    raise ConfigError(f"config key '{key}.ca': a trust bundle is required with tls = true")
                cfg.backend_tls[name] = BackendTLS(
                    Path(_str(t["ca"], f"{key}.ca")),
                    Path(_str(t["cert"], f"{key}.cert")) if "cert" in t else None,
                    Path(_str(t["key"], f"{key}.key")) if "key" in t else None,
                    _str(t["server_name"], f"{key}.server_name") if "server_name" in t else None)
            elif any(k in t for k in ("ca", "cert", "key", "server_name")):
                raise ConfigError(f"config key '{key}': ca/cert/key/server_name need tls = true")
        else:
            cfg.endpoints[name] = parse_hostport(v, key)
    return cfg


def parse_networks(value, key: str) -> list:
    """A list of CIDRs (``"10.0.0.0/8"``) or a comma-separated string."""
    import ipaddress

    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ConfigError(f"config key '{key}': expected a list of CIDRs")
    out = []
    for n in items:
        try:
            out.append(ipaddress.ip_network(str(n).strip(), strict=False))
        except ValueError:
            raise ConfigError(f"config key '{key}': {n!r} is not a CIDR") from None
    return out


def _zerotrust(t):
    from relayd.control.oidc import Provider
    from relayd.control.zerotrust import ZtConfig

    t = _known(t, {"site", "claims_ttl", "entitlement_ttl", "device_limit", "revocation_mode", "max_staleness",
                   "providers", "tun_pool", "tun_mtu"}, "zerotrust")
    z = ZtConfig()
    if "site" in t:
        z.site = _check_name(_str(t["site"], "zerotrust.site"), "zerotrust.site")
    for k in ("claims_ttl", "entitlement_ttl", "max_staleness"):
        if k in t:
            setattr(z, k, parse_duration(t[k], f"zerotrust.{k}"))
    if "device_limit" in t:
        if not isinstance(t["device_limit"], int) or t["device_limit"] < 0:
            raise ConfigError("config key 'zerotrust.device_limit': a number, 0 or more")
        z.device_limit = t["device_limit"]
    if "revocation_mode" in t:
        z.revocation_mode = _str(t["revocation_mode"], "zerotrust.revocation_mode")
    if "tun_pool" in t:
        z.tun_pool = _str(t["tun_pool"], "zerotrust.tun_pool")
    if "tun_mtu" in t:
        if not isinstance(t["tun_mtu"], int) or isinstance(t["tun_mtu"], bool):
            raise ConfigError("config key 'zerotrust.tun_mtu': a number")
        z.tun_mtu = t["tun_mtu"]
    provs = t.get("providers", {})
    if not isinstance(provs, dict):
        raise ConfigError("config key 'zerotrust.providers': expected [zerotrust.providers.NAME] tables")
    for name, p in provs.items():
        key = f"zerotrust.providers.{name}"
        _check_name(name, key)
        p = _known(p, {"issuer", "client_id", "client_secret", "scopes", "groups_claim", "username_claim", "ca"}, key)
        for need in ("issuer", "client_id", "client_secret"):
            if need not in p:
                raise ConfigError(f"config key '{key}.{need}' is required")
        z.providers[name] = Provider(name, _str(p["issuer"], key + ".issuer"), _str(p["client_id"], key),
                                     _str(p["client_secret"], key), **{k: _str(p[k], f"{key}.{k}") for k in
                                                                      ("scopes", "groups_claim", "username_claim",
                                                                       "ca") if k in p})
    return z.validate()


def _acme(t):
    from relayd.control.acme import AcmeConfig

    t = _known(t, {"directory", "email", "challenge", "http_listen", "renew_before", "ca", "names", "retry",
                   "retry_max"}, "acme")
    a = AcmeConfig()
    if "directory" not in t:
        raise ConfigError("config key 'acme.directory' is required (the CA's directory URL, like "
                          "https://acme-v02.api.letsencrypt.org/directory)")
    a.directory = t["directory"] if isinstance(t["directory"], str) else ""
    for k in ("email", "challenge"):
        if k in t:
            setattr(a, k, _str(t[k], f"acme.{k}"))
    if "http_listen" in t:
        a.http_listen = parse_hostport(t["http_listen"], "acme.http_listen") if t["http_listen"] else None
    for k in ("renew_before", "retry", "retry_max"):
        if k in t:
            setattr(a, k, parse_duration(t[k], f"acme.{k}"))
    if "ca" in t:
        a.ca = Path(_str(t["ca"], "acme.ca"))
    if "names" in t:
        if not isinstance(t["names"], list) or not all(isinstance(n, str) for n in t["names"]):
            raise ConfigError("config key 'acme.names': expected a list of host names")
        a.names = [n.lower() for n in t["names"]]
    return a.validate()


def parse_endpoint_flag(text: str, flag: str) -> tuple[str, tuple[str, int]]:
    """NAME=HOST:PORT from the command line."""
    name, sep, addr = text.partition("=")
    if not sep:
        raise ConfigError(f"{flag} {text!r}: expected NAME=HOST:PORT")
    return _check_name(name, flag), parse_hostport(addr, flag)
