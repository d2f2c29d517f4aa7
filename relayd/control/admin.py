"""The relay's own resources in the REST API (docs/api.md): its status and
CA, the admin key, agents, join tokens, endpoints, hybrid connections and
their shared access rules, under ``/api/v1/admin``.

Theory of operation
-------------------
`relayd admin` does everything through the route table these handlers
belong to (with the zero-trust ones of relayd.control.ztapi and the OTPs of
relayd.control.provisioning): with ``--data DIR`` in its own process
(``Api.local``: the same dispatch, checks and handlers, without the key),
with ``--api URL`` over HTTPS against a running relay. So each thing has
one implementation, here, over the store; the command line only formats
what the routes answer (relayd.cli_admin), and the same subcommand prints
the same lines either way.

What the database does not hold comes from a ``RelayView``: in the relay
(relayd.gateway.adminview) it is live: who is connected now and what they
offer, open streams, the endpoints' traffic counters, the hybrid
connections of the config and their listeners. From a data directory it is
what the running relay wrote there (relay.json, hybrid-listeners.json, the
agents' status in the database, every two seconds); what nobody can know
from there is null.

Rules and hybrid connections of the relay's config file are served but not
changed here (409: edit the file and reload); a rule added here under a
name the config uses would be shadowed by it, so that is a 409 too. In the
relay a change is in effect when its answer comes (a revoked agent's link
is cut, a new hybrid connection takes listeners); from a data directory it
reaches the running relay within half a second (its revision poll).

In URLs a hybrid connection's path is written with its slashes as ``~``
(``a/b/c`` is ``a~b~c``; no path holds a ``~``): the HTTPS front door
refuses encoded slashes, and the API takes one segment per parameter.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson

import relayd
from relayd.config import parse_duration
from relayd.control import sas
from relayd.control.api import (JSON, KEY_FILE, ApiError, Op, Request, listing, new_admin_key, no_content, ok,
                                rfc3339)
from relayd.control.hybrid import Catalog, HybridConnection, check_path
from relayd.control.jointoken import JoinToken
from relayd.control.policy import Conflict
from relayd.errors import ConfigError

A = "/admin"
#: What the running relay writes in its data directory for `relayd admin --data`.
RELAY_FILE = "relay.json"
LISTENERS_FILE = "hybrid-listeners.json"
DEFAULT_JOIN_TTL = 15 * 60.0
MAX_JOIN_TTL = 365 * 86400.0


def hc_id(path: str) -> str:
    """A hybrid connection's path as one URL segment."""
    return path.replace("/", "~")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _null(schema: dict) -> dict:
    t = schema["type"]
    return {**schema, "type": [*(t if isinstance(t, list) else [t]), "null"]}


_TIME = {"type": "string", "format": "date-time"}
_COUNT = {"type": "integer", "minimum": 0}
_AGENT_ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
             "description": "an agent id, such as ag-0123456789ab"}
_TOKEN_ID = {"type": "string", "pattern": r"^[A-Za-z0-9_-]{8,16}$", "description": "a join token's id"}
_ENDPOINT = {"type": "string", "pattern": r"^(site:)?[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
             "description": "an endpoint name (1-63 of A-Z a-z 0-9 _ . -; site:ID for a zero-trust site)"}
_PATH_CHARS = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HC_PATH = {"type": "string", "minLength": 1, "maxLength": 260, "pattern": rf"^{_PATH_CHARS}(/{_PATH_CHARS})*$",
            "description": "a hybrid connection path: segments of letters, digits, '-', '.' and '_' joined by '/', "
                           "at most 260 characters"}
_HC_ID = {"type": "string", "minLength": 1, "maxLength": 260, "pattern": rf"^{_PATH_CHARS}(~{_PATH_CHARS})*$",
          "description": "a hybrid connection path with its slashes written as ~ (a/b is a~b)"}
_RULE = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^[A-Za-z0-9._-]+$",
         "description": "a SAS rule name: 1 to 256 letters, digits, '-', '.' or '_'"}
_KEY = {"type": "string", "minLength": 16, "maxLength": 256, "pattern": r"^[\x20-\x7e]+$",
        "description": "a key: 16 to 256 printable characters (default: 32 random bytes in Base64)"}
_RIGHTS = {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "string", "enum": list(sas.RIGHTS)},
           "description": "rights: some of listen, send, manage (manage implies the other two)"}
_DURATION = {"type": ["string", "integer"], "description": "a duration such as 15m, 2h or 7d, or seconds"}
_HOST = {"type": "string", "maxLength": 260,
         "pattern": r"^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$", "description": "HOST or HOST:PORT"}
_LISTENER = {"type": "object", "additionalProperties": False, "required": ["id", "address", "since"],
             "properties": {"id": {"type": "string"}, "address": {"type": "string"}, "since": _TIME}}

SCHEMAS = {
    "RelayStatus": {
        "type": "object", "additionalProperties": False,
        "required": ["live", "version", "node", "started_at", "hostname", "agents_address", "https_address",
                     "ca_pin", "agents", "endpoints", "hybrid_connections", "hybrid_listeners", "join_tokens_pending"],
        "properties": {
            "live": {"type": "boolean", "description": "true: the running relay answered; false: "
                                                       "`relayd admin --data` read its data directory"},
            "version": {"type": "string"}, "node": _null({"type": "string"}),
            "started_at": _null(_TIME), "hostname": _null({"type": "string"}),
            "agents_address": {"type": "string", "description": "where agents dial (join tokens name it)"},
            "https_address": _null({"type": "string"}), "ca_pin": {"type": "string"},
            "agents": {"type": "object", "additionalProperties": False, "required": ["total", "online", "revoked"],
                       "properties": {"total": _COUNT, "online": _COUNT, "revoked": _COUNT}},
            "endpoints": _COUNT, "hybrid_connections": _COUNT, "hybrid_listeners": _COUNT,
            "join_tokens_pending": _COUNT}},
    "CaCertificate": {"type": "object", "additionalProperties": False, "required": ["certificate", "pin"],
                      "properties": {"certificate": {"type": "string", "description": "PEM"},
                                     "pin": {"type": "string", "description": "sha256: and the hex SHA-256 of its "
                                                                              "DER, as join tokens carry it"}}},
    "AdminKey": {"type": "object", "additionalProperties": False, "required": ["key"],
                 "properties": {"key": {"type": "string", "description": "the new admin key: shown this once; "
                                                                         "the previous one fails from now on"}}},
    "Agent": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "status", "endpoints", "created_at", "revoked_at", "cert_not_after", "connected_since",
                     "last_seen", "address", "bytes_in", "bytes_out", "offered", "serving", "streams", "node",
                     "device"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["online", "offline", "revoked"]},
            "endpoints": {"type": "array", "items": {"type": "string"},
                          "description": "the endpoints its join token allows (empty: any)"},
            "created_at": _TIME, "revoked_at": _null(_TIME), "cert_not_after": _TIME,
            "connected_since": _null(_TIME), "last_seen": _null(_TIME), "address": _null({"type": "string"}),
            "bytes_in": {**_COUNT, "description": "bytes from the agent over its link (live in the relay; else as "
                                                  "last written, every 2 s)"},
            "bytes_out": _COUNT,
            "offered": _null({"type": "array", "items": {"type": "string"},
                              "description": "the endpoints it offered at connect (null: not connected here)"}),
            "serving": _null({"type": "array", "items": {"type": "string"},
                              "description": "those of them this relay has (null: not connected here)"}),
            "streams": _null({**_COUNT, "description": "streams open on its link now (null: not connected here)"}),
            "node": _null({"type": "string", "description": "the relay its device tunnel was last on"}),
            "device": _null({"type": "object", "additionalProperties": False, "required": ["name", "labels", "claimed"],
                             "properties": {"name": {"type": "string"}, "labels": {"type": "object"},
                                            "claimed": {"type": "boolean"}},
                             "description": "for a device enrolled over EST (docs/device-cloud.md)"})}},
    "JoinTokenRequest": {"type": "object", "additionalProperties": False, "properties": {
        "endpoints": {"type": "array", "items": _ENDPOINT, "maxItems": 64,
                      "description": "the endpoints the agent may serve (default: any)"},
        "ttl": {**_DURATION, "description": "how long it can be redeemed: a duration such as 15m (default), at most "
                                            "365d"},
        "transport": {"type": "string", "enum": ["tls", "wss"],
                      "description": "the address it names: the agents port (tls, default) or the HTTPS port (wss)"}}},
    "JoinToken": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "state", "endpoints", "created_at", "expires_at", "used_at", "revoked_at", "agent_id"],
        "properties": {"id": {"type": "string"},
                       "state": {"type": "string", "enum": ["pending", "used", "expired", "revoked"]},
                       "endpoints": {"type": "array", "items": {"type": "string"}}, "created_at": _TIME,
                       "expires_at": _TIME, "used_at": _null(_TIME), "revoked_at": _null(_TIME),
                       "agent_id": _null({"type": "string", "description": "the agent it enrolled"}),
                       "token": {"type": "string", "description": "the token to give `relayd agent --join`: in the "
                                                                  "answer that made it only"},
                       "address": {"type": "string", "description": "the relay address the token names (new tokens)"}}},
    "Endpoint": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "kind", "listen", "route", "agents", "connections", "held", "streams_active",
                     "streams_opened", "streams_failed", "bytes_in", "bytes_out"],
        "properties": {
            "name": {"type": "string"}, "kind": {"type": "string", "enum": ["tcp", "http", "site"]},
            "listen": _null({"type": "string", "description": "a TCP endpoint's public address"}),
            "route": _null({"type": "string", "description": "an HTTP endpoint's HOSTNAME[/PREFIX]"}),
            "agents": _null({"type": "array", "items": {"type": "string"}, "description": "agents serving it now"}),
            "connections": _null({**_COUNT, "description": "public TCP connections open now"}),
            "held": _null({**_COUNT, "description": "requests waiting for an agent (grace)"}),
            "streams_active": _null(_COUNT), "streams_opened": _null(_COUNT), "streams_failed": _null(_COUNT),
            "bytes_in": _null({**_COUNT, "description": "bytes toward the agents since the relay started"}),
            "bytes_out": _null({**_COUNT, "description": "bytes from the agents since the relay started"})},
        "description": "Endpoints come from the relay's configuration (flags or TOML; SIGHUP reloads them); "
                       "counters are null where only the data directory was read."},
    "SasRuleInfo": {"type": "object", "additionalProperties": False, "required": ["name", "rights", "source"],
                    "properties": {"name": {"type": "string"}, "rights": {"type": "array", "items": {"type": "string"}},
                                   "source": {"type": "string", "enum": ["data", "config"]}}},
    "HybridConnection": {
        "type": "object", "additionalProperties": False,
        "required": ["id", "path", "source", "rules", "listeners", "active_connections", "bytes_to_listener",
                     "bytes_to_sender"],
        "properties": {
            "id": {"type": "string", "description": "the path as one URL segment (slashes as ~)"},
            "path": {"type": "string"},
            "source": {"type": "string", "enum": ["data", "config"],
                       "description": "data: made here or by `relayd admin hc`; config: the relay's config file"},
            "requires_client_auth": {"type": "boolean"}, "websocket": {"type": "boolean"}, "http": {"type": "boolean"},
            "response_timeout": {"type": "number"}, "control_threshold": {"type": "integer"},
            "max_listeners": {"type": "integer"},
            "rules": {"type": "array", "items": _ref("SasRuleInfo")},
            "listeners": {"type": "array", "items": _LISTENER, "description": "the listeners connected now"},
            "active_connections": _null({**_COUNT, "description": "sender connections open now"}),
            "bytes_to_listener": _null(_COUNT), "bytes_to_sender": _null(_COUNT)},
        "description": "The options are absent for a hybrid connection of the config seen from a data directory."},
    "HybridConnectionRequest": {
        "type": "object", "additionalProperties": False, "required": ["path"],
        "properties": {"path": _HC_PATH,
                       "requires_client_auth": {"type": "boolean", "description": "senders need a Send token "
                                                                                  "(default true)"},
                       "websocket": {"type": "boolean"}, "http": {"type": "boolean"},
                       "response_timeout": {**_DURATION, "description": "a listener's HTTP answer deadline (60s)"},
                       "control_threshold": {"type": "integer", "minimum": 1024, "maximum": 65536},
                       "max_listeners": {"type": "integer", "minimum": 1, "maximum": 1000}}},
    "SasRuleRequest": {"type": "object", "additionalProperties": False, "required": ["name", "rights"],
                       "properties": {"name": _RULE, "rights": _RIGHTS, "key": _KEY}},
    "KeyRequest": {"type": "object", "additionalProperties": False, "properties": {"key": _KEY}},
    "HostRequest": {"type": "object", "additionalProperties": False, "properties": {
        "host": {**_HOST, "description": "HOST[:PORT] the connection strings name (default: the relay's HTTPS "
                                         "address)"}}},
    "SasRuleKeys": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "rights", "scope", "primary_key", "secondary_key", "primary_connection_string",
                     "secondary_connection_string"],
        "properties": {"name": {"type": "string"}, "rights": {"type": "array", "items": {"type": "string"}},
                       "scope": _null({"type": "string", "description": "the hybrid connection (null: the node)"}),
                       "primary_key": {"type": "string"},
                       "secondary_key": _null({"type": "string", "description": "the previous primary, after a "
                                                                                "rotation"}),
                       "primary_connection_string": _null({"type": "string"}),
                       "secondary_connection_string": _null({"type": "string"})},
        "description": "Secrets: only in the answers that make, rotate or list them (POST)."},
}


class RelayView:
    """What the admin routes know of the relay beyond its database, as
    ``relayd admin --data DIR`` sees it: what the running relay wrote in
    its data directory. The relay's own view (relayd.gateway.adminview)
    answers the same questions live."""

    live = False

    def __init__(self, data: Path, store) -> None:
        self.data = Path(data)
        self.store = store

    def _file(self, name: str):
        try:
            return orjson.loads((self.data / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None

    def info(self) -> dict:
        """relay.json: ``advertised`` (agents' address), ``https``,
        ``hostname``, ``node``, ``started_at``, ``endpoints``."""
        info = self._file(RELAY_FILE)
        if not isinstance(info, dict) or not isinstance(info.get("advertised"), str):
            path = self.data / RELAY_FILE
            raise ConfigError(f"{path} is damaged: start `relayd serve --data {self.data}` again to rewrite it")
        return info

    def sessions(self) -> dict[str, dict]:
        """The agents connected to this relay now, by id: ``offered``,
        ``serving``, ``address``, ``connected_since``, ``streams``,
        ``bytes_in``, ``bytes_out``. None known from a data directory."""
        return {}

    def endpoints(self) -> list[dict]:
        """The endpoints: ``name``, ``kind``, ``listen`` or ``route``, and
        the live fields of the Endpoint schema (None here)."""
        out = []
        for e in self.info().get("endpoints") or ():
            if isinstance(e, dict) and isinstance(e.get("name"), str):
                out.append({"name": e["name"], "kind": e.get("kind", "tcp"), "listen": e.get("listen"),
                            "route": e.get("route"), "agents": None, "connections": None, "held": None,
                            "streams_active": None, "streams_opened": None, "streams_failed": None,
                            "bytes_in": None, "bytes_out": None})
        return out

    def hybrid(self) -> tuple[Catalog, Catalog]:
        """(the catalog served, the config's part of it)."""
        return self.store.hc_catalog(), Catalog()

    def listeners(self) -> dict[str, list[dict]]:
        """{path: [{id, address, since (epoch)}]} of the listeners now."""
        table = self._file(LISTENERS_FILE)
        return table if isinstance(table, dict) else {}

    def hybrid_traffic(self) -> dict[str, dict]:
        """{path: {active_connections, bytes_to_listener, bytes_to_sender}}."""
        return {}

    def agent_revoked(self, agent_id: str) -> None:
        """An agent was revoked: the relay cuts its link (from a data
        directory: the running relay's revision poll does, within a second)."""

    def hybrid_changed(self) -> None:
        """Hybrid connections or rules changed in the database: the relay
        serves them from now on (from a data directory: within a second)."""


def _rule_info(rule: sas.SasRule, source: str) -> dict:
    return {"name": rule.name, "rights": sorted(rule.rights), "source": source}


def _epoch(t) -> float | None:
    return t if isinstance(t, (int, float)) and not isinstance(t, bool) else None


class AdminResources:
    """The handlers over a Store, the relay's CA and data directory, and a
    RelayView."""

    def __init__(self, store, ca, data: Path, view: RelayView) -> None:
        self.store = store
        self.ca = ca
        self.data = Path(data) if data is not None else None
        self.view = view

    # -- the relay -----------------------------------------------------------------------------

    def status(self, req: Request):
        info = self.view.info()
        agents = self.store.list_agents()
        live = self.view.sessions()
        catalog, _ = self.view.hybrid()
        listeners = self.view.listeners()
        return ok({
            "live": self.view.live, "version": relayd.__version__, "node": info.get("node"),
            "started_at": rfc3339(_epoch(info.get("started_at"))), "hostname": info.get("hostname"),
            "agents_address": info["advertised"], "https_address": info.get("https"), "ca_pin": self.ca.pin,
            "agents": {"total": len(agents), "revoked": sum(a["revoked_at"] is not None for a in agents),
                       "online": sum(self._agent(a, live.get(a["id"]), {})["status"] == "online" for a in agents)},
            "endpoints": len(self.view.endpoints()), "hybrid_connections": len(catalog.connections),
            "hybrid_listeners": sum(len(v) for v in listeners.values()),
            "join_tokens_pending": sum(t["state"] == "pending" for t in self.store.list_join_tokens())})

    def ca_cert(self, req: Request):
        return ok({"certificate": self.ca.cert_pem.decode(), "pin": self.ca.pin})

    def rotate_key(self, req: Request):
        """A new admin key; the file the first start wrote holds the old one
        now, so it goes."""
        req.target = "admin-key"
        key = new_admin_key()
        self.store.set_admin_key(key)
        if self.data is not None:
            (self.data / KEY_FILE).unlink(missing_ok=True)
        return ok({"key": key})

    # -- agents ----------------------------------------------------------------------------------

    def _extras(self) -> dict[str, dict]:
        """node and device of every agent that has them."""
        out = {}
        for aid, node, name, labels, owner in self.store.query(
                "SELECT a.id, a.node, d.name, d.labels, d.owner FROM agents a LEFT JOIN dc_devices d ON d.id = a.id"
                " WHERE a.node IS NOT NULL OR d.id IS NOT NULL"):
            out[aid] = {"node": node, "device": None if name is None else {
                "name": name, "labels": orjson.loads(labels or "{}"), "claimed": owner is not None}}
        return out

    @staticmethod
    def _agent(a: dict, sess: dict | None, extra: dict) -> dict:
        online = sess is not None or a["connected_since"] is not None
        status = "revoked" if a["revoked_at"] is not None else "online" if online else "offline"
        src = sess if sess is not None else a
        return {"id": a["id"], "status": status, "endpoints": a["endpoints"], "created_at": rfc3339(a["created_at"]),
                "revoked_at": rfc3339(a["revoked_at"]), "cert_not_after": rfc3339(a["cert_not_after"]),
                "connected_since": rfc3339(src["connected_since"]),
                "last_seen": rfc3339(time.time() if sess is not None else a["last_seen"]),
                "address": src["address"], "bytes_in": src["bytes_in"], "bytes_out": src["bytes_out"],
                "offered": sess["offered"] if sess else None, "serving": sess["serving"] if sess else None,
                "streams": sess["streams"] if sess else None, "node": extra.get("node"),
                "device": extra.get("device")}

    def list_agents(self, req: Request):
        live, extras = self.view.sessions(), self._extras()
        return ok({"items": [self._agent(a, live.get(a["id"]), extras.get(a["id"], {}))
                             for a in self.store.list_agents()]})

    def _one_agent(self, agent_id: str) -> dict:
        a = self.store.get_agent(agent_id)
        if a is None:
            raise ApiError(404, "not_found", f"no agent {agent_id!r}")
        return self._agent(a, self.view.sessions().get(agent_id), self._extras().get(agent_id, {}))

    def get_agent(self, req: Request):
        return ok(self._one_agent(req.params["agent_id"]))

    def revoke_agent(self, req: Request):
        if not self.store.revoke_agent(req.params["agent_id"]):
            raise ApiError(404, "not_found", f"no agent {req.params['agent_id']!r}")
        self.view.agent_revoked(req.params["agent_id"])
        return ok(self._one_agent(req.params["agent_id"]))

    # -- join tokens -------------------------------------------------------------------------------

    @staticmethod
    def _token(t: dict) -> dict:
        return {"id": t["id"], "state": t["state"], "endpoints": t["endpoints"],
                "created_at": rfc3339(t["created_at"]), "expires_at": rfc3339(t["expires_at"]),
                "used_at": rfc3339(t["used_at"]), "revoked_at": rfc3339(t["revoked_at"]), "agent_id": t["agent_id"]}

    def create_join_token(self, req: Request):
        b = req.body or {}
        ttl = parse_duration(b.get("ttl", DEFAULT_JOIN_TTL), "ttl")
        if not 0 < ttl <= MAX_JOIN_TTL:
            raise ConfigError("ttl: more than 0 and at most 365d")
        info = self.view.info()
        address = info["advertised"]
        if b.get("transport") == "wss":
            if not info.get("https"):
                raise ConfigError("this relay has no --https listener: agents cannot use --transport wss")
            address = info["https"]
        token_id, secret = self.store.create_join_token(list(dict.fromkeys(b.get("endpoints", []))), ttl)
        req.target = token_id
        doc = self._token(self.store.get_join_token(token_id))
        doc.update(token=JoinToken(address, self.ca.pin, token_id, secret).encode(), address=address)
        return ok(doc, 201, ((b"Location", f"/api/v1/admin/join-tokens/{token_id}".encode()),))

    def list_join_tokens(self, req: Request):
        return ok({"items": [self._token(t) for t in self.store.list_join_tokens()]})

    def get_join_token(self, req: Request):
        t = self.store.get_join_token(req.params["token_id"])
        if t is None:
            raise ApiError(404, "not_found", f"no join token {req.params['token_id']!r}")
        return ok(self._token(t))

    def revoke_join_token(self, req: Request):
        done = self.store.revoke_join_token(req.params["token_id"])
        if done is None:
            raise ApiError(404, "not_found", f"no join token {req.params['token_id']!r}")
        if done is False:
            raise ApiError(409, "already_used", "this join token enrolled an agent already: revoke the agent instead")
        return no_content()

    # -- endpoints ---------------------------------------------------------------------------------

    def list_endpoints(self, req: Request):
        return ok({"items": self.view.endpoints()})

    def get_endpoint(self, req: Request):
        for e in self.view.endpoints():
            if e["name"] == req.params["name"]:
                return ok(e)
        raise ApiError(404, "not_found", f"no endpoint {req.params['name']!r}")

    # -- hybrid connections --------------------------------------------------------------------------

    def _hc_items(self) -> list[dict]:
        catalog, config = self.view.hybrid()
        listeners = {p.lower(): (p, v) for p, v in self.view.listeners().items() if isinstance(v, list)}
        traffic = {p.lower(): v for p, v in self.view.hybrid_traffic().items()}
        none = {} if self.view.live else None  # no traffic yet, or nobody can tell
        out = []
        for key, hc in sorted(catalog.connections.items()):
            source = "config" if key in config.connections else "data"
            item = {"id": hc_id(hc.path), "path": hc.path, "source": source,
                    **{k: getattr(hc, k) for k in ("requires_client_auth", "websocket", "http", "response_timeout",
                                                    "control_threshold", "max_listeners")},
                    "rules": [_rule_info(r, source) for r in hc.rules]}
            out.append(self._hc_live(item, listeners.pop(key, ("", []))[1], traffic.get(key, none)))
        # Listeners of hybrid connections this view has no catalog entry for
        # (the config's, seen from a data directory).
        for key, (path, ls) in sorted(listeners.items()):
            if ls:
                out.append(self._hc_live({"id": hc_id(path), "path": path, "source": "config", "rules": []},
                                         ls, traffic.get(key, none)))
        return out

    @staticmethod
    def _hc_live(item: dict, listeners: list, traffic: dict | None) -> dict:
        item["listeners"] = [{"id": str(lst.get("id", "")), "address": str(lst.get("address", "")),
                              "since": rfc3339(_epoch(lst.get("since")) or 0)}
                             for lst in listeners if isinstance(lst, dict)]
        for k in ("active_connections", "bytes_to_listener", "bytes_to_sender"):
            item[k] = None if traffic is None else traffic.get(k, 0)
        return item

    def _hc(self, hc_param: str) -> tuple[HybridConnection, bool]:
        """The hybrid connection a URL names, and whether it is the config's."""
        path = check_path(hc_param.replace("~", "/"))
        catalog, config = self.view.hybrid()
        hc = catalog.connections.get(path.lower())
        if hc is None:
            raise ApiError(404, "not_found", f"no hybrid connection {path!r}")
        return hc, hc.key in config.connections

    def list_hcs(self, req: Request):
        return ok({"items": self._hc_items()})

    def get_hc(self, req: Request):
        hc, _ = self._hc(req.params["hc"])
        for item in self._hc_items():
            if item["path"].lower() == hc.key:
                return ok(item)
        raise ApiError(404, "not_found", f"no hybrid connection {hc.path!r}")  # deleted meanwhile

    def create_hc(self, req: Request):
        b = dict(req.body)
        path = check_path(b.pop("path"))
        req.target = path
        if "response_timeout" in b:
            b["response_timeout"] = parse_duration(b["response_timeout"], "response_timeout")
        hc = HybridConnection(path, **b)
        catalog, config = self.view.hybrid()
        if hc.key in catalog.connections:
            where = "the relay's configuration" if hc.key in config.connections else "the data directory"
            raise Conflict(f"hybrid connection {path!r} already exists (in {where})")
        self.store.hc_create(hc)
        self.view.hybrid_changed()
        item = {"id": hc_id(hc.path), "path": hc.path, "source": "data",
                **{k: getattr(hc, k) for k in ("requires_client_auth", "websocket", "http", "response_timeout",
                                                "control_threshold", "max_listeners")}, "rules": []}
        return ok(self._hc_live(item, [], {} if self.view.live else None), 201,
                  ((b"Location", f"/api/v1/admin/hybrid-connections/{hc_id(hc.path)}".encode()),))

    def delete_hc(self, req: Request):
        hc, from_config = self._hc(req.params["hc"])
        if from_config:
            raise Conflict(f"hybrid connection {hc.path!r} is defined in the relay's configuration: remove it there "
                           "and reload")
        req.target = hc.path
        if not self.store.hc_delete(hc.path):
            raise ApiError(404, "not_found", f"no hybrid connection {hc.path!r}")
        self.view.hybrid_changed()
        return no_content()

    # -- shared access rules (the node's: scope "", or a hybrid connection's) ---------------------------

    def _scope(self, req: Request) -> tuple[str, tuple, tuple, str, bool]:
        """(scope, its rules, those of the config, what to call it, whether
        the config defines the whole scope)."""
        if "hc" not in req.params:
            catalog, config = self.view.hybrid()
            return "", catalog.rules, config.rules, "the node", False
        hc, from_config = self._hc(req.params["hc"])
        return hc.path, hc.rules, hc.rules if from_config else (), hc.path, from_config

    def _rule(self, req: Request) -> tuple[str, sas.SasRule, bool, str]:
        scope, rules, config, where, _ = self._scope(req)
        name = req.params["rule"]
        rule = next((r for r in rules if r.name == name), None)
        if rule is None:
            raise ApiError(404, "not_found", f"no rule {name!r} in {where}")
        return scope, rule, any(r.name == name for r in config), where

    def _keys(self, scope: str, rule: sas.SasRule, host: str | None) -> dict:
        if host is None:
            https = self.view.info().get("https")
            if https:
                h, _, port = https.rpartition(":")
                host = h if port == "443" else https
        strings = [str(sas.ConnectionString(f"sb://{host}/", rule.name, key, scope)) if host and key else None
                   for key in (rule.primary_key, rule.secondary_key)]
        return {"name": rule.name, "rights": sorted(rule.rights), "scope": scope or None,
                "primary_key": rule.primary_key, "secondary_key": rule.secondary_key or None,
                "primary_connection_string": strings[0], "secondary_connection_string": strings[1]}

    def list_node_rules(self, req: Request):
        catalog, config = self.view.hybrid()
        names = {r.name for r in config.rules}
        return ok({"items": [_rule_info(r, "config" if r.name in names else "data") for r in catalog.rules]})

    def add_rule(self, req: Request):
        scope, rules, config, where, from_config = self._scope(req)
        b = req.body
        req.target = f"{scope}:{b['name']}"
        if from_config:
            raise Conflict(f"the rules of {where} are in the relay's configuration: add it there and reload")
        if any(r.name == b["name"] for r in config):
            raise Conflict(f"the relay's configuration has a rule {b['name']!r} in {where} already")
        if any(r.name == b["name"] for r in rules):
            raise Conflict(f"a rule {b['name']!r} exists already in {where}")
        rule = sas.SasRule(b["name"], b.get("key") or sas.new_key(), rights=sas.parse_rights(b["rights"]))
        self.store.hc_rule_add(scope, rule)
        self.view.hybrid_changed()
        return ok(self._keys(scope, rule, None), 201)

    def rotate_rule(self, req: Request):
        scope, rule, from_config, where = self._rule(req)
        req.target = f"{scope}:{rule.name}"
        if from_config:
            raise Conflict(f"rule {rule.name!r} of {where} is in the relay's configuration: change its key there")
        rule = self.store.hc_rule_rotate(scope, rule.name, (req.body or {}).get("key") or sas.new_key())
        self.view.hybrid_changed()
        return ok(self._keys(scope, rule, None))

    def remove_rule(self, req: Request):
        scope, rule, from_config, where = self._rule(req)
        req.target = f"{scope}:{rule.name}"
        if from_config:
            raise Conflict(f"rule {rule.name!r} of {where} is in the relay's configuration: remove it there")
        if not self.store.hc_rule_remove(scope, rule.name):
            raise ApiError(404, "not_found", f"no rule {rule.name!r} in {where}")
        self.view.hybrid_changed()
        return no_content()

    def rule_keys(self, req: Request):
        scope, rule, _, _ = self._rule(req)
        req.target = f"{scope}:{rule.name}"
        host = (req.body or {}).get("host")
        keys = self._keys(scope, rule, host)
        if keys["primary_connection_string"] is None:
            raise ConfigError("this relay has no --https listener, where hybrid connections are served: name the "
                              "host (host)")
        return ok(keys)

    # -- the table --------------------------------------------------------------------------------------

    def ops(self) -> list[Op]:
        agent = {"agent_id": _AGENT_ID}
        token = {"token_id": _TOKEN_ID}
        hcp = {"hc": _HC_ID}
        out = [
            Op("GET", f"{A}/status", self.status, "get_status", "The relay: addresses, CA pin and counts", "relay",
               responses={200: ("The relay's status", _ref("RelayStatus"), (JSON,))}),
            Op("GET", f"{A}/ca", self.ca_cert, "get_ca", "The relay's CA certificate and its pin", "relay",
               responses={200: ("The CA", _ref("CaCertificate"), (JSON,))}),
            Op("POST", f"{A}/api-key/rotate", self.rotate_key, "rotate_admin_key",
               "A new admin key; the one of this request fails from the next request on", "relay", write=True,
               session=False,
               responses={200: ("The new key: shown this once", _ref("AdminKey"), (JSON,))},
               description="As `relayd admin api-key rotate`. The admin-api.key file the first start wrote is "
                           "deleted: it holds the old key. Takes the key itself, never a console session "
                           "(which the rotation ends)."),
            Op("GET", f"{A}/agents", self.list_agents, "list_agents", "Agents, with their link state now", "agents",
               responses={200: ("The agents, oldest first", listing(_ref("Agent")), (JSON,))}),
            Op("GET", f"{A}/agents/{{agent_id}}", self.get_agent, "get_agent", "An agent", "agents", params=agent,
               responses={200: ("The agent", _ref("Agent"), (JSON,))}),
            Op("POST", f"{A}/agents/{{agent_id}}/revoke", self.revoke_agent, "revoke_agent",
               "Revoke an agent: its live link is cut within a second, its certificate refused", "agents",
               params=agent, write=True, responses={200: ("The agent, revoked", _ref("Agent"), (JSON,))}),
            Op("GET", f"{A}/join-tokens", self.list_join_tokens, "list_join_tokens",
               "Join tokens (never their secrets): pending, used, expired and revoked ones of the last 7 days",
               "agents", responses={200: ("The join tokens", listing(_ref("JoinToken")), (JSON,))}),
            Op("POST", f"{A}/join-tokens", self.create_join_token, "create_join_token",
               "A single-use join token for one agent", "agents", body=_ref("JoinTokenRequest"), body_optional=True,
               write=True, responses={201: ("The join token: `token` is shown this once", _ref("JoinToken"),
                                            (JSON,))}),
            Op("GET", f"{A}/join-tokens/{{token_id}}", self.get_join_token, "get_join_token", "A join token",
               "agents", params=token, responses={200: ("The join token", _ref("JoinToken"), (JSON,))}),
            Op("DELETE", f"{A}/join-tokens/{{token_id}}", self.revoke_join_token, "revoke_join_token",
               "Revoke an unused join token", "agents", params=token, write=True, errors=(409,),
               responses={204: ("Revoked", None, ())}),
            Op("GET", f"{A}/endpoints", self.list_endpoints, "list_endpoints",
               "TCP and HTTP endpoints, with the agents serving them and their traffic", "endpoints",
               responses={200: ("The endpoints", listing(_ref("Endpoint")), (JSON,))}),
            Op("GET", f"{A}/endpoints/{{name}}", self.get_endpoint, "get_endpoint", "An endpoint", "endpoints",
               params={"name": _ENDPOINT}, responses={200: ("The endpoint", _ref("Endpoint"), (JSON,))}),
            Op("GET", f"{A}/hybrid-connections", self.list_hcs, "list_hybrid_connections",
               "Hybrid connections, their rules (never keys) and their listeners now", "hybrid",
               responses={200: ("The hybrid connections", listing(_ref("HybridConnection")), (JSON,))}),
            Op("POST", f"{A}/hybrid-connections", self.create_hc, "create_hybrid_connection",
               "Create a hybrid connection", "hybrid", body=_ref("HybridConnectionRequest"), write=True,
               errors=(409,), responses={201: ("Created", _ref("HybridConnection"), (JSON,))}),
            Op("GET", f"{A}/hybrid-connections/{{hc}}", self.get_hc, "get_hybrid_connection",
               "A hybrid connection", "hybrid", params=hcp,
               responses={200: ("The hybrid connection", _ref("HybridConnection"), (JSON,))}),
            Op("DELETE", f"{A}/hybrid-connections/{{hc}}", self.delete_hc, "delete_hybrid_connection",
               "Delete a hybrid connection and its rules; its listeners are closed within a second", "hybrid",
               params=hcp, write=True, errors=(409,), responses={204: ("Deleted", None, ())}),
            Op("GET", f"{A}/hybrid-rules", self.list_node_rules, "list_node_rules",
               "The node's shared access rules (never keys)", "hybrid",
               responses={200: ("The rules", listing(_ref("SasRuleInfo")), (JSON,))}),
        ]
        for scope, params, base in (("node", {}, f"{A}/hybrid-rules"),
                                    ("hc", hcp, f"{A}/hybrid-connections/{{hc}}/rules")):
            one = {**params, "rule": _RULE}
            what = "the node" if scope == "node" else "a hybrid connection"
            keys = (JSON,)
            out += [
                Op("POST", base, self.add_rule, f"add_{scope}_rule", f"Add a shared access rule to {what}", "hybrid",
                   params=params, body=_ref("SasRuleRequest"), write=True, errors=(409,),
                   responses={201: ("The rule with its key: shown in this answer", _ref("SasRuleKeys"), keys)}),
                Op("DELETE", f"{base}/{{rule}}", self.remove_rule, f"remove_{scope}_rule",
                   f"Remove a shared access rule of {what}", "hybrid", params=one, write=True, errors=(409,),
                   responses={204: ("Removed", None, ())}),
                Op("POST", f"{base}/{{rule}}/rotate", self.rotate_rule, f"rotate_{scope}_rule",
                   "A new primary key; the previous one stays good as the secondary until the next rotation",
                   "hybrid", params=one, body=_ref("KeyRequest"), body_optional=True, write=True, errors=(409,),
                   responses={200: ("The rule's keys now", _ref("SasRuleKeys"), keys)}),
                Op("POST", f"{base}/{{rule}}/list-keys", self.rule_keys, f"list_{scope}_rule_keys",
                   "A rule's keys and connection strings (as Azure's listKeys)", "hybrid", params=one,
                   body=_ref("HostRequest"), body_optional=True,
                   responses={200: ("The keys", _ref("SasRuleKeys"), keys)}),
            ]
        return out
