"""The relay's REST API under ``/api/v1`` (docs/api.md): one route table,
which the server dispatches on and the OpenAPI 3.1 document is made from.

Theory of operation
-------------------
Each route is an ``Op``: method, path template, handler, and the JSON
schemas of its path and query parameters, its request body and its
answers. ``Api.handle`` takes one whole request (the HTTPS front door
buffers it, up to ``MAX_BODY``) and answers it in a fixed order, so that
each refusal has one status and one place:

1. the path against the templates: 404 for no route, 405 (with ``Allow``)
   for a route without that method;
2. the query string: a credential in it (``access_token=`` ...) is refused
   with 400 before anything else looks at it (it would sit in proxies' and
   browsers' histories), as is a parameter the route does not take;
3. the admin key, ``Authorization: Bearer <key>``: 401 with
   ``WWW-Authenticate``. The store keeps its SHA-256 and is read at every
   request, so a rotation by `relayd admin api-key rotate` (another
   process) takes effect at once; the comparison is constant time. In the
   relay, a request without the header may carry the web console's session
   cookie instead, with its CSRF token (relayd.control.console, through
   ``accept_sessions``), for every route of the key but those marked
   ``session=False`` (rotating the key, making a session);
4. the body: 415 for a media type the route does not take, 400 for bytes
   that are not JSON (or TOML where taken) or not an object, 422 for one
   that does not match the route's schema (unknown fields included);
5. the handler: its own refusals (``ApiError``), 409 for a ``Conflict``,
   422 for any other ``ConfigError`` (the control plane's validation, the
   same the command line gets), 503 when the database fails, 500 for a bug.

The schemas are JSON Schema 2020-12 as OpenAPI 3.1 takes them; the subset
``check`` implements (type, properties, required, additionalProperties,
items, prefixItems, sizes, pattern, enum, const, bounds, $ref) validates
the bodies of routes that have no validator of their own, so the document
cannot promise what the server does not check. Routes whose objects the
control plane validates (policy objects: relayd.control.policy.check)
describe them with the same schemas but leave the check to it.

Every answer is counted in ``relayd_api_requests_total{route, method,
status}`` (the route's template: bounded labels); refusals are logged
(rate limited) and every write is an audit line (logger ``relayd.audit``,
actor ``api``), with the route, the target's id and the client: never the
key, a body or a query string.

The handlers run in a worker thread (the store and argon2 block).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import re
import secrets
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

import orjson

from relayd import metrics
from relayd.control.policy import Conflict
from relayd.core import http1
from relayd.errors import ConfigError, StorageError
from relayd.log import RateLimitedLog, caught

log = logging.getLogger("relayd.api")
audit_log = logging.getLogger("relayd.audit")
_LOG = RateLimitedLog(log)

PREFIX = "/api/v1"
#: The largest request body (a whole policy document fits many times).
MAX_BODY = 2 * 1024 * 1024
#: JSON (or TOML) nesting deeper than this is refused before any handler sees it.
MAX_DEPTH = 32
#: Where the relay writes the admin key it made at its first start (mode 0600).
KEY_FILE = "admin-api.key"
KEY_PREFIX = "rak_"
REALM = 'Bearer realm="relayd"'
#: Query parameter names that carry credentials somewhere: never taken here.
_CREDENTIAL_PARAMS = {"access_token", "token", "key", "api_key", "apikey", "auth", "authorization", "password",
                      "secret", "bearer"}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
JSON = "application/json"


def new_admin_key() -> str:
    """A fresh admin key: 256 random bits, base64url, with a prefix that
    secret scanners can spot."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def rfc3339(t: float | None) -> str | None:
    """Seconds since the epoch as an RFC 3339 UTC time (milliseconds when
    the time has a fraction)."""
    if t is None:
        return None
    spec = "seconds" if float(t).is_integer() else "milliseconds"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec=spec).replace("+00:00", "Z")


def parse_rfc3339(text: str, where: str) -> float:
    """An RFC 3339 time with its offset: seconds since the epoch."""
    try:
        t = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        t = None
    if t is None or t.tzinfo is None or not re.match(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d", text):
        raise ConfigError(f"{where}: an RFC 3339 time with an offset, such as 2030-01-31T12:00:00Z")
    return t.timestamp()


class ApiError(Exception):
    """A refusal with its status, error code and message."""

    def __init__(self, status: int, code: str, message: str, headers: tuple = ()) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def ok(doc, status: int = 200, headers: tuple = ()) -> http1.Reply:
    return http1.json_reply(status, doc, headers)


def listing(item: dict, **more: dict) -> dict:
    """The schema of a list answer, the API's one shape for them:
    ``{"items": [item, ...]}`` (and the properties ``more``)."""
    props = {"items": {"type": "array", "items": item}, **more}
    return {"type": "object", "additionalProperties": False, "required": sorted(props), "properties": props}


def no_content() -> http1.Reply:
    return http1.Reply(204)


@dataclass
class Request:
    """What a handler gets: the path's parameters (decoded), the query's,
    the body (parsed JSON; TOML as a document too) and its media type."""

    method: str
    params: dict
    query: dict
    body: object
    media_type: str
    accept: str
    client: str
    #: The write's target for the audit line (default: the path parameters).
    target: str = ""
    #: Who the route's own ``auth`` found the caller to be (None: the admin key).
    principal: object = None
    #: Who asks, for audit lines and records: ``api`` (the admin key over
    #: HTTPS) or ``cli`` (`relayd admin --data` on the relay's host).
    actor: str = "api"


@dataclass(frozen=True)
class Op:
    """One route. ``path`` is a template under PREFIX (``{name}`` takes one
    path segment); ``params`` and ``query`` map names to schemas; ``body``
    is the request body's schema (None: no body), checked here unless
    ``own_check`` (the handler validates it with the control plane's own
    check); ``responses`` maps each success status to (description,
    schema or None, media types)."""

    method: str
    path: str
    handler: Callable
    name: str
    summary: str
    tag: str
    params: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)
    body: dict | None = None
    body_types: tuple = (JSON,)
    own_check: bool = False
    #: The body may be left out (the handler gets None).
    body_optional: bool = False
    responses: dict = field(default_factory=dict)
    errors: tuple = ()
    #: True: the admin key; False: none; or a function ``(head, cred) ->
    #: principal`` raising ApiError (cred: ``{"cert": DER}`` of the TLS
    #: client, or what the way in vouches for; ``"client"``: its address).
    auth: bool | Callable = True
    #: After auth, before the body is parsed: ``(principal, raw body)``,
    #: raising ApiError (a route's own size limit, a rate).
    admit: Callable | None = None
    #: The OpenAPI security scheme of a route with its own ``auth`` (a
    #: tuple: several schemes, all required together).
    security: str | tuple = "adminKey"
    #: A route of the admin key that a web console session may call too
    #: (relayd.control.console); False for what takes the key itself.
    session: bool = True
    write: bool = False
    description: str = ""

    @property
    def segments(self) -> list[str]:
        return self.path.strip("/").split("/")


#: The error answers every route may give, and those a route adds.
_ERRORS = {400: "Bad request: not JSON, not an object, or a query parameter the route does not take; as text/plain, "
                "a path the HTTPS front door refuses before the API sees it (an encoded slash, a climb above the root)",
           401: "No admin key, or the wrong one",
           403: "Not from here: the caller's network (or role) may not use this route",
           404: "No such route or object",
           405: "The route does not take this method",
           409: "The object exists already, something still refers to it, it was used already, or the relay's "
                "configuration file owns it",
           412: "The object is not in the state the operation needs (a device that must be online)",
           413: "The body is over the limit",
           415: "The body's media type is not one the route takes",
           429: "Too many requests: try again after Retry-After seconds",
           422: "The body or a parameter does not validate: the message says where",
           503: "The relay's database failed; try again"}
_COMMON_ERRORS = (400, 404, 405, 413, 503)


class Api:
    """The route table and its dispatcher. ``key_ok(key)`` says whether a
    bearer key is the admin key now; ``schemas`` are the named schemas the
    ops refer to (``#/components/schemas/NAME``)."""

    def __init__(self, key_ok: Callable[[str], bool], version: str) -> None:
        self.key_ok = key_ok
        self.version = version
        self.ops: list[Op] = []
        #: ``(head) -> actor | None``: the web console's session in place of
        #: the key (None: the request carries none; ApiError: refused).
        self.session_auth: Callable | None = None
        self._session_security: dict | None = None
        self.security_schemes: dict = {}
        self.schemas: dict = {"Error": {
            "type": "object", "required": ["error", "message"], "additionalProperties": False,
            "properties": {"error": {"type": "string", "description": "a stable code"},
                           "message": {"type": "string", "description": "what was wrong, for people"}}}}
        self.add([Op("GET", "/openapi.json", self._openapi, "openapi", "This API's OpenAPI 3.1 document", "meta",
                     responses={200: ("The document", {"type": "object"}, (JSON,))}, auth=False,
                     description="Readable without the admin key: it describes the routes, and holds no "
                                 "data of the relay.")])

    def add(self, ops: list[Op], schemas: dict | None = None, security: dict | None = None) -> None:
        self.security_schemes.update(security or {})
        for op in ops:
            if any(o.method == op.method and o.segments == op.segments for o in self.ops):
                raise ValueError(f"route {op.method} {op.path} twice")
            if set(op.errors) - set(_ERRORS):
                # Found at start, not as a 500 from GET /openapi.json.
                raise ValueError(f"route {op.method} {op.path}: error status {sorted(set(op.errors) - set(_ERRORS))}"
                                 " has no description in api._ERRORS")
        for name, schema in (schemas or {}).items():
            if self.schemas.get(name, schema) != schema:
                # One name, two schemas: the last would silently describe both modules' answers.
                raise ValueError(f"schema {name!r} given twice, differently")
        self.ops += ops
        self.schemas.update(schemas or {})

    def accept_sessions(self, auth: Callable, schemes: dict) -> None:
        """Let the routes of the admin key (but those with ``session=False``)
        take a web console session too: ``auth(head)`` as ``session_auth``;
        ``schemes``: its OpenAPI security schemes, all required together."""
        self.session_auth = auth
        self.security_schemes.update(schemes)
        self._session_security = {name: [] for name in schemes}

    # -- the route table -----------------------------------------------------------------

    def match(self, path: str) -> tuple[list[tuple[Op, dict]], str | None]:
        """The ops whose template matches ``path`` (under PREFIX) with their
        decoded parameters, and the template (None: no route)."""
        if not (path == PREFIX or path.startswith(PREFIX + "/")):
            return [], None
        parts = path[len(PREFIX):].strip("/").split("/") if path != PREFIX else [""]
        out, template = [], None
        for op in self.ops:
            segs = op.segments
            if len(segs) != len(parts):
                continue
            params = {}
            for s, p in zip(segs, parts):
                if s[:1] == "{":
                    try:
                        v = urllib.parse.unquote(p, errors="strict")
                    except UnicodeDecodeError:
                        break
                    if not v:
                        break
                    params[s[1:-1]] = v
                elif s != p:
                    break
            else:
                out.append((op, params))
                template = op.path
        return out, template

    def route_of(self, path: str) -> str:
        """The metric label of ``path``: its template, or ``-``."""
        return self.match(path)[1] or "-"

    # -- a request ---------------------------------------------------------------------------

    async def serve(self, head, body: bytes, ex) -> http1.Reply:
        """A relayd.net.http_ingress ``buffered`` service."""
        sslobj = ex.conn.transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        return _no_store(await asyncio.to_thread(self.handle, head.method.decode("latin-1"),
                                                 head.target.decode("latin-1"), head, body, ex.client[0],
                                                 {"cert": der}))

    def too_large(self, head, ex) -> http1.Reply:
        path = head.path.decode("latin-1")
        return _no_store(self._answer(self.route_of(path), head.method.decode("latin-1"), ex.client[0],
                                      ApiError(413, "too_large", f"the body is over {MAX_BODY // 1024} KiB")))

    def local(self, method: str, path: str, body: bytes = b"", headers: tuple = ()) -> http1.Reply:
        """One request of this host's own command line (`relayd admin
        --data DIR`, relayd.cli_admin): the same dispatch, checks and
        handlers as over HTTPS, without the admin key (whoever can read the
        data directory has the database the key guards), for the routes
        of the admin key only. The database's failures and bugs raise as
        they are, for the command line to report."""
        target = PREFIX + path
        head = http1.RequestHead(method.encode(), target.encode(), b"HTTP/1.1", list(headers))
        return self.handle(method, target, head, body, "local", local=True)

    def handle(self, method: str, target: str, head, body: bytes, client: str, cred: dict | None = None,
               local: bool = False) -> http1.Reply:
        path, _, qs = target.partition("?")
        found, template = self.match(path)
        route = template or "-"
        try:
            if not found:
                raise ApiError(404, "not_found", "no such route: see GET /api/v1/openapi.json")
            want = "GET" if method == "HEAD" else method
            hits = [(op, p) for op, p in found if op.method == want]
            if not hits:
                allow = sorted({op.method for op, _ in found} | ({"HEAD"} if any(o.method == "GET" for o, _ in found)
                                                                  else set()))
                raise ApiError(405, "method_not_allowed", f"this route takes {', '.join(allow)}",
                               ((b"Allow", ", ".join(allow).encode()),))
            op, params = hits[0]
            query = self._query(op, qs)
            principal, actor = None, "api"
            if local:
                actor = "cli"
                if op.auth and op.security != "adminKey":
                    raise ApiError(401, "unauthorized", "this route is for users and devices, not the admin")
            elif callable(op.auth):
                principal = op.auth(head, {"client": client, **(cred or {})})
            elif op.auth:
                actor = self._authorize(head, op)
            if op.admit is not None:
                op.admit(principal, body)
            self._check_params(op, params, query)
            req = Request(method, params, query, None, "", (head.get(b"accept") or b"").decode("latin-1"), client,
                          principal=principal, actor=actor)
            req.body, req.media_type = self._body(op, head, body)
            reply = op.handler(req)
        except ApiError as exc:
            return self._answer(route, method, client, exc)
        except Conflict as exc:
            return self._answer(route, method, client, ApiError(409, "conflict", str(exc)))
        except ConfigError as exc:
            return self._answer(route, method, client, ApiError(422, "invalid", str(exc)))
        except (StorageError, sqlite3.Error):
            if local:
                raise
            return self._answer(route, method, client, ApiError(503, "unavailable", "the database failed"))
        except Exception as exc:  # a bug: this request's answer only
            if local:
                raise
            caught("api", exc, route=route)
            return self._answer(route, method, client, ApiError(500, "internal", "the relay failed"))
        if op.write and reply.status < 300:
            audit_log.info("admin api write", extra={"actor": req.actor, "action": op.name, "route": route,
                                                     "target": req.target or "/".join(params.values()),
                                                     "client": client, "status": reply.status})
        metrics.API_REQUESTS.labels(route, _method(method), str(reply.status)).inc()
        return reply

    def _answer(self, route: str, method: str, client: str, exc: ApiError) -> http1.Reply:
        metrics.API_REQUESTS.labels(route, _method(method), str(exc.status)).inc()
        lvl = logging.WARNING if exc.status >= 500 else logging.INFO
        _LOG.log(lvl, "api request refused", extra={"route": route, "method": _method(method),
                                                   "status": exc.status, "error": exc.code, "client": client})
        return http1.error_reply(exc.status, exc.code, str(exc), exc.headers)

    def _query(self, op: Op, qs: str) -> dict:
        if not qs:
            return {}
        try:
            pairs = urllib.parse.parse_qsl(qs, keep_blank_values=True, strict_parsing=True, errors="strict",
                                           max_num_fields=16)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_query", "the query string does not parse") from None
        names = [k.lower() for k, _ in pairs]
        if _CREDENTIAL_PARAMS & set(names):
            raise ApiError(400, "credentials_in_query",
                           "credentials never go in the query string: send Authorization: Bearer <admin key>")
        out = {}
        for k, v in pairs:
            if k not in op.query:
                raise ApiError(400, "bad_query", f"this route takes no query parameter {k[:32]!r}")
            if k in out:
                raise ApiError(400, "bad_query", f"query parameter {k!r} given twice")
            out[k] = v
        return out

    def _authorize(self, head, op: Op) -> str:
        """The admin key (or a console session where the route takes one):
        who asks, for audit lines and records."""
        v = head.get(b"authorization")
        if v is None and self.session_auth is not None and op.session:
            actor = self.session_auth(head)
            if actor is not None:
                return actor
        if v is None or v[:7].lower() != b"bearer " or not v[7:].strip():
            raise ApiError(401, "unauthorized", "this route needs Authorization: Bearer <admin key>",
                           ((b"WWW-Authenticate", REALM.encode()),))
        if not self.key_ok(v[7:].strip().decode("latin-1")):
            raise ApiError(401, "unauthorized", "wrong admin key",
                           ((b"WWW-Authenticate", (REALM + ', error="invalid_token"').encode()),))
        return "api"

    def _body(self, op: Op, head, body: bytes) -> tuple[object, str]:
        if op.body is None:
            if body:
                raise ApiError(400, "bad_request", "this route takes no body")
            return None, ""
        if not body and op.body_optional:
            return None, ""
        media = (head.get(b"content-type") or b"").split(b";", 1)[0].strip().lower().decode("latin-1")
        if media not in op.body_types:
            raise ApiError(415, "unsupported_media_type", f"send the body as {' or '.join(op.body_types)}")
        if not body:
            raise ApiError(400, "bad_request", "the body is empty")
        if media == "application/toml":
            import tomllib

            try:
                doc = tomllib.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
                raise ApiError(400, "bad_toml", "the body is not TOML (UTF-8)") from None
        else:
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError:
                raise ApiError(400, "bad_json", "the body is not JSON (UTF-8)") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "bad_request", "the body is not a JSON object")
        if _depth(doc) > MAX_DEPTH:
            raise ApiError(422, "invalid", f"the body nests deeper than {MAX_DEPTH} levels")
        if not op.own_check:
            self.check(op.body, doc, "body")
        return doc, media

    def _check_params(self, op: Op, params: dict, query: dict) -> None:
        for name, v in params.items():
            try:
                self.check(op.params[name], v, name)
            except ConfigError:
                raise ApiError(404, "not_found", f"no such {name}: {_describe(op.params[name])}") from None
        for name, v in query.items():
            schema = op.query[name]
            if schema.get("type") == "integer":
                if not re.fullmatch(r"\d{1,18}", v):
                    raise ConfigError(f"query parameter {name}: expected a whole number")
                v = query[name] = int(v)
            self.check(schema, v, name)

    # -- schemas -----------------------------------------------------------------------------

    def check(self, schema: dict, v, where: str) -> None:
        """``v`` against ``schema`` (the subset described above);
        ConfigError naming the first place that does not match."""
        if "$ref" in schema:
            return self.check(self.schemas[schema["$ref"].rsplit("/", 1)[1]], v, where)
        if "const" in schema and not _same(v, schema["const"]):
            raise ConfigError(f"{where}: must be {orjson.dumps(schema['const']).decode()}")
        if "enum" in schema and not any(_same(v, e) for e in schema["enum"]):
            raise ConfigError(f"{where}: one of {', '.join(orjson.dumps(e).decode() for e in schema['enum'])}")
        types = schema.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            if not any(_is(v, t) for t in types):
                raise ConfigError(f"{where}: expected {' or '.join(types)}")
        if "oneOf" in schema:
            good = 0
            for s in schema["oneOf"]:
                try:
                    self.check(s, v, where)
                    good += 1
                except ConfigError:
                    pass
            if good != 1:
                raise ConfigError(f"{where}: {_describe(schema)}")
        if isinstance(v, str):
            if len(v) < schema.get("minLength", 0) or len(v) > schema.get("maxLength", 1 << 30):
                raise ConfigError(f"{where}: {_describe(schema)}")
            if "pattern" in schema and not _pattern(schema["pattern"]).search(v):
                raise ConfigError(f"{where}: {_describe(schema)}")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if v < schema.get("minimum", float("-inf")) or v > schema.get("maximum", float("inf")):
                raise ConfigError(f"{where}: between {schema.get('minimum')} and {schema.get('maximum')}")
        elif isinstance(v, list):
            if len(v) < schema.get("minItems", 0) or len(v) > schema.get("maxItems", 1 << 30):
                raise ConfigError(f"{where}: {schema.get('minItems', 0)} to {schema.get('maxItems', 'any number of')}"
                                  " items")
            prefix = schema.get("prefixItems", [])
            for i, x in enumerate(v):
                s = prefix[i] if i < len(prefix) else schema.get("items")
                if s is False:
                    raise ConfigError(f"{where}: at most {len(prefix)} items")
                if s is not None:
                    self.check(s, x, f"{where}[{i}]")
        elif isinstance(v, dict):
            props = schema.get("properties", {})
            for k in schema.get("required", []):
                if k not in v:
                    raise ConfigError(f"{where}: '{k}' is required")
            if len(v) < schema.get("minProperties", 0):
                raise ConfigError(f"{where}: give at least {schema['minProperties']} of "
                                  f"{', '.join(sorted(props))}")
            for k, x in v.items():
                if k in props:
                    if props[k].get("readOnly"):
                        continue
                    self.check(props[k], x, f"{where}.{k}")
                elif schema.get("additionalProperties", True) is False:
                    raise ConfigError(f"{where}: unknown field {k[:64]!r}")
                elif isinstance(schema.get("additionalProperties"), dict):
                    self.check(schema["additionalProperties"], x, f"{where}.{k}")

    # -- the OpenAPI document --------------------------------------------------------------------

    def openapi(self) -> dict:
        """The OpenAPI 3.1 document of the route table."""
        paths: dict = {}
        for op in self.ops:
            item = paths.setdefault(PREFIX + op.path, {})
            params = [{"name": n, "in": "path", "required": True, "schema": s} for n, s in op.params.items()]
            params += [{"name": n, "in": "query", "required": False, "schema": s} for n, s in op.query.items()]
            doc = {"operationId": op.name, "summary": op.summary, "tags": [op.tag]}
            if op.description:
                doc["description"] = op.description
            if params:
                doc["parameters"] = params
            if op.body is not None:
                doc["requestBody"] = {"required": not op.body_optional,
                                      "content": {t: {"schema": op.body} for t in op.body_types}}
            responses = {}
            for status, (text, schema, types) in op.responses.items():
                r = {"description": text}
                if schema is not None:
                    r["content"] = {t: {"schema": schema if t == JSON else {"type": "string"}} for t in types}
                responses[str(status)] = r
            errors = set(_COMMON_ERRORS) | set(op.errors) | ({401} if op.auth else set())
            if op.body is not None:
                errors |= {415, 422}
            if op.query:
                errors.add(422)
            for status in sorted(errors):
                content = {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}
                if status == 400:
                    # The front door's own refusals come before the API (docs/api.md).
                    content["text/plain"] = {"schema": {"type": "string"}}
                responses[str(status)] = {"description": _ERRORS[status], "content": content}
            doc["responses"] = responses
            doc["security"] = self._security(op)
            item[op.method.lower()] = doc
        return {
            "openapi": "3.1.0",
            "info": {"title": "relayd API", "version": self.version,
                     "description": "The relay's REST API. Admin routes take `Authorization: Bearer <admin key>` "
                                    "(`relayd admin api-key rotate`). Errors are `{\"error\", \"message\"}`; times "
                                    "are RFC 3339 UTC; ids are strings."},
            "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
            "paths": paths,
            "components": {"schemas": self.schemas, "securitySchemes": {"adminKey": {
                "type": "http", "scheme": "bearer",
                "description": "The relay's admin key: `admin-api.key` in its data directory after the first "
                               "start, or the output of `relayd admin api-key rotate --data DIR`."},
                **self.security_schemes}},
        }

    def _security(self, op: Op) -> list:
        if not op.auth:
            return []
        if callable(op.auth):
            names = op.security if isinstance(op.security, tuple) else (op.security,)
            return [{n: [] for n in names}]
        if op.session and self._session_security:
            return [{"adminKey": []}, dict(self._session_security)]
        return [{"adminKey": []}]

    def _openapi(self, req: Request) -> http1.Reply:
        return ok(self.openapi())


def _no_store(r: http1.Reply) -> http1.Reply:
    """Answers of the API hold secrets (a new join token, keys) and live
    state: no cache keeps them, a browser's included."""
    if any(k.lower() == b"cache-control" for k, _ in r.headers):
        return r
    return http1.Reply(r.status, r.body, r.content_type, tuple(r.headers) + ((b"Cache-Control", b"no-store"),))


@functools.lru_cache(maxsize=256)
def _pattern(p: str) -> re.Pattern:
    # ECMA's $ is the end of the text; Python's also matches before a final
    # newline: "alice\n" must not pass ^[a-z]+$.
    return re.compile(p[:-1] + r"\Z" if p.endswith("$") and not p.endswith("\\$") else p)


def _method(m: str) -> str:
    return m if m in _METHODS else "other"


def _is(v, t: str) -> bool:
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    return t == "null" and v is None


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def _describe(schema: dict) -> str:
    if "description" in schema:
        return schema["description"]
    if "pattern" in schema:
        return f"must match {schema['pattern']}"
    return f"{schema.get('minLength', 0)} to {schema.get('maxLength', 'any number of')} characters"


def _depth(v, d: int = 0) -> int:
    if d > MAX_DEPTH:
        return d
    if isinstance(v, dict):
        return max((_depth(x, d + 1) for x in v.values()), default=d + 1)
    if isinstance(v, list):
        return max((_depth(x, d + 1) for x in v), default=d + 1)
    return d
