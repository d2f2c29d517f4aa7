"""Azure Relay Hybrid Connections on the wire, sans-I/O: request targets,
the relay's query parameters, and the control channel's JSON messages.

Every ``sb-hc-*`` query parameter belongs to the relay, every other to the
application (``../shared/specs/hybrid-connections.md`` section 2). Messages
on a listener's control channel are UTF-8 text frames, one JSON object each,
whose one key names the message: the relay sends ``accept`` and ``request``,
a listener ``renewToken`` and ``response`` (section 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import orjson

from relayd.errors import ProtocolError

HC_PREFIX = "/$hc/"
LISTEN, CONNECT, ACCEPT, REQUEST = "listen", "connect", "accept", "request"
#: The relay's own query parameter naming a rendezvous (an unguessable key;
#: its ``sb-hc-`` prefix makes listeners hide it from applications).
RENDEZVOUS = "sb-hc-rendezvous"
#: A control message's largest size (.NET listeners read into 64 KiB).
MAX_CONTROL_MESSAGE = 64 * 1024


class HcProtocolError(ProtocolError):
    """A listener's control message that is not one (bad JSON, wrong shape)."""


@dataclass(frozen=True)
class Target:
    """A request target under ``/$hc/``: the path (decoded, no slashes at
    the ends), the relay's parameters (lower-case names, decoded values) and
    the application's query as it came (without the relay's pairs)."""

    path: str
    params: dict
    app_query: str

    @property
    def action(self) -> str:
        return self.params.get("sb-hc-action", "")


def parse_target(target: bytes) -> Target | None:
    """``/$hc/{path}[?query]`` -> Target; None for other targets."""
    text = target.decode("latin-1")
    if not text.startswith(HC_PREFIX):
        return None
    path, _, query = text[len(HC_PREFIX):].partition("?")
    params, app = split_query(query)
    return Target(unquote(path).strip("/"), params, app)


def split_query(query: str) -> tuple[dict, str]:
    """A query -> (the relay's parameters: lower-case names, decoded values;
    the application's pairs as they came). A pair is the relay's when its
    name starts with ``sb-hc-`` and it has an ``=`` (``?sb-hc-undefined``
    stays the application's, as Azure keeps it)."""
    params: dict = {}
    app = []
    for pair in query.split("&") if query else ():
        name, eq, value = pair.partition("=")
        if eq and name.lower().startswith("sb-hc-"):
            params.setdefault(name.lower(), unquote(value))
        elif pair:
            app.append(pair)
    return params, "&".join(app)


def address(host: str, path: str, suffix: str, app_query: str, params: list[tuple[str, str]]) -> str:
    """A rendezvous address: ``wss://host/$hc/path[/suffix]?[app&]sb-hc-...``."""
    full = path + ("/" + suffix if suffix else "")
    query = "&".join([app_query] * bool(app_query) + [f"{k}={quote(v, safe='')}" for k, v in params])
    return f"wss://{host}{HC_PREFIX}{quote(full, safe='/')}?{query}"


def accept_message(address_: str, id_: str, connect_headers: dict, remote: tuple[str, int] | None) -> str:
    """The ``accept`` a listener gets when a sender wants a WebSocket."""
    body: dict = {"address": address_, "id": id_, "connectHeaders": connect_headers}
    if remote is not None:
        body["remoteEndpoint"] = {"address": remote[0], "port": remote[1]}
    return orjson.dumps({"accept": body}).decode()


@dataclass(frozen=True)
class RenewToken:
    token: str


@dataclass(frozen=True)
class Response:
    """A listener's answer to an HTTP-mode request."""

    request_id: str
    status: int
    description: str
    headers: dict
    body: bool


@dataclass(frozen=True)
class Unknown:
    """A message of another name: ignored, as Microsoft's clients do."""

    name: str


def parse_listener_message(text: str):
    """A listener's text message -> RenewToken, Response or Unknown;
    HcProtocolError if it is not a JSON object with one message in it."""
    if len(text) > MAX_CONTROL_MESSAGE:
        raise HcProtocolError("control message over 64 KiB")
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise HcProtocolError("control message is not JSON") from None
    if not isinstance(doc, dict) or len(doc) != 1:
        raise HcProtocolError("control message is not one named object")
    (name, body), = doc.items()
    if not isinstance(body, dict):
        raise HcProtocolError(f"control message {name[:40]!r} is not an object")
    if name == "renewToken":
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise HcProtocolError("renewToken without a token")
        return RenewToken(token)
    if name == "response":
        rid, status = body.get("requestId"), body.get("statusCode")
        if isinstance(status, str) and status.isdigit():
            status = int(status)
        headers = body.get("responseHeaders") or {}
        if (not isinstance(rid, str) or not isinstance(status, int) or isinstance(status, bool)
                or not 100 <= status <= 999 or not isinstance(headers, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise HcProtocolError("response without a requestId, a status code or with bad headers")
        desc = body.get("statusDescription") or ""
        return Response(rid, status, desc if isinstance(desc, str) else "", headers, bool(body.get("body")))
    return Unknown(name)
