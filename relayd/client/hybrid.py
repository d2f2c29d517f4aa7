"""A Python client for Azure Relay Hybrid Connections: listener and sender,
WebSocket and HTTP modes, for relayd and for Azure itself (Microsoft ships
none for Python). asyncio; the WebSocket frames are relayd's own codec
(relayd.core.wsframe, compiled).

    from relayd.client import hybrid

    cs = hybrid.parse_connection_string("Endpoint=sb://relay.example.com/;"
                                        "SharedAccessKeyName=...;SharedAccessKey=...;EntityPath=orders")

    async def echo(ws):                      # a sender's WebSocket, accepted
        async for message in ws:
            await ws.send(message)

    async def answer(request):               # an HTTP-mode request
        return hybrid.Response(200, {"content-type": "text/plain"}, b"hello " + request.body)

    listener = hybrid.Listener(cs, on_accept=echo, on_request=answer)
    await listener.run()                     # reconnects with backoff, renews its token

    async with await hybrid.connect(cs, suffix="a/b", query="x=1") as ws:   # a sender
        await ws.send(b"hi")
        print(await ws.recv())

    status, headers, body = await hybrid.request(cs, "POST", "/items", b"...")

``ssl`` (an SSLContext: the relay's CA) and ``proxy`` (``http://[user:pass@]host:port``,
default: ``HTTPS_PROXY``) are arguments of each. docs/hybrid.md has the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl as _ssl
import time
import urllib.parse
from dataclasses import dataclass, field

import orjson

from relayd.control.sas import ConnectionString, make_token, parse_connection_string
from relayd.core import http1
from relayd.core import wsframe as ws
from relayd.core.wshandshake import client_handshake
from relayd.errors import InvalidHandshake, RelaydError
from relayd.net.proxy import connect_via_proxy, parse_proxy_url, proxy_from_env

__all__ = ["parse_connection_string", "ConnectionString", "token_for", "Listener", "connect", "request",
           "WebSocket", "Request", "Response", "HandshakeRefused"]

log = logging.getLogger("relayd.client.hybrid")

#: Seconds a token made here lives (hyco's and .NET's: an hour); it is
#: renewed at half that.
TOKEN_TTL = 3600
#: The largest frame sent (a message above it goes in several).
FRAME = 1024 * 1024
_BACKOFF = (0, 1, 2, 5, 10, 30)  # seconds before each reconnect, as Microsoft's clients wait


class HandshakeRefused(RelaydError):
    """The relay answered the handshake with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def token_for(cs: ConnectionString, path: str, ttl: int = TOKEN_TTL) -> str:
    """A SAS token for ``path`` of the connection string's namespace (its
    own signature when it carries one)."""
    if cs.signature:
        return cs.signature
    return make_token(f"http://{cs.host}/{path.strip('/')}", cs.key_name, cs.key, int(time.time()) + ttl)


def _authority(cs: ConnectionString) -> str:
    return cs.host if cs.port == 443 else f"{cs.host}:{cs.port}"


# -- a WebSocket client on relayd's codec -----------------------------------------------------


class WebSocket:
    """A client WebSocket connection: ``recv()`` gives str (text) or bytes
    (binary) messages, ``send()`` takes either; iterate it for messages
    until the peer closes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, subprotocol: str | None,
                 rest: bytes, config: ws.WsConfig | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.subprotocol = subprotocol
        self.conn = ws.Connection(True, config or ws.WsConfig(max_message=64 * 1024 * 1024,
                                                              max_frame=64 * 1024 * 1024))
        self.close_code = 0
        self._events: list = []
        self._rest = rest

    async def recv(self):
        """The next message; ConnectionError when the connection ended."""
        while True:
            while self._events:
                ev = self._events.pop(0)
                cls = type(ev)
                if cls is ws.TextMessage or cls is ws.BinaryMessage:
                    return ev.data
                if cls is ws.Close or cls is ws.WsProtocolError:
                    self.close_code = ev.code if cls is ws.Close else ev.close_code
                    await self._flush()
                    self.writer.close()
                    raise ConnectionError(f"WebSocket closed ({self.close_code})")
            if self._rest:
                data, self._rest = self._rest, b""
            else:
                data = await self.reader.read(65536)
            if not data:
                self._events += self.conn.receive_eof()
                if not self._events:
                    raise ConnectionError("WebSocket connection lost")
                continue
            self._events += self.conn.receive_data(data)
            await self._flush()

    async def send(self, message) -> None:
        """One message; over FRAME bytes it goes in frames of FRAME (relays
        bound a frame's size, not a message's)."""
        text = isinstance(message, str)
        data = message.encode() if text else bytes(message)
        if len(data) <= FRAME:
            (self.conn.send_text if text else self.conn.send_binary)(data)
            await self._flush()
            return
        await self.send_parts((data[i:i + FRAME] for i in range(0, len(data), FRAME)), text)

    async def send_parts(self, parts, text: bool = False) -> None:
        """One message in several frames (an iterable of bytes)."""
        first = True
        for piece in parts:
            if first:
                (self.conn.send_text if text else self.conn.send_binary)(piece, fin=False)
                first = False
            else:
                self.conn.send_continuation(piece, False)
            await self._flush()
        if first:
            (self.conn.send_text if text else self.conn.send_binary)(b"", fin=True)
        else:
            self.conn.send_continuation(b"", True)
        await self._flush()

    async def close(self, code: int = ws.CLOSE_NORMAL, reason: str = "") -> None:
        if self.conn.state == ws.OPEN:
            self.conn.send_close(code, reason)
            try:
                await self._flush()
            except ConnectionError:
                pass
        self.writer.close()

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return await self.recv()
        except ConnectionError:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> "WebSocket":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _open(url: str, headers=(), subprotocols=(), ssl: _ssl.SSLContext | None = None,
                proxy: str | None = None, timeout: float = 30.0) -> WebSocket:
    """A WebSocket to a ``wss://`` URL, through ``proxy`` if given (or
    HTTPS_PROXY); HandshakeRefused when the relay answers otherwise."""
    u = urllib.parse.urlsplit(url)
    host, port = u.hostname, u.port or 443
    target = u.path + ("?" + u.query if u.query else "")
    ctx = ssl or _ssl.create_default_context()
    px = parse_proxy_url(proxy, "proxy") if proxy else proxy_from_env(host)
    async with asyncio.timeout(timeout):
        if px is not None:
            sock = await connect_via_proxy(px, host, port, timeout)
            reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=host)
        else:
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host)
        try:
            hs = client_handshake(u.netloc if u.port else host, target, subprotocols=subprotocols,
                                  extra_headers=list(headers))
            writer.write(hs.request)
            buf = b""
            while (end := http1.head_end(buf)) < 0:
                if len(buf) > http1.LIMITS.max_head:
                    raise ConnectionError("oversized handshake reply")
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the relay closed the connection during the handshake")
                buf += data
            head = http1.parse_response_head(buf[:end])
            if head.status != 101:
                raise HandshakeRefused(head.status, head.reason.decode("latin-1"))
            proto = hs.check(head.status, head.headers)
        except BaseException:
            writer.close()
            raise
    return WebSocket(reader, writer, proto, buf[end:])


# -- sender ----------------------------------------------------------------------------------


async def connect(cs: ConnectionString | str, path: str = "", *, suffix: str = "", query: str = "",
                  subprotocols=(), headers=(), ssl: _ssl.SSLContext | None = None, proxy: str | None = None,
                  anonymous: bool = False) -> WebSocket:
    """A sender's WebSocket to the hybrid connection ``path`` (default: the
    connection string's EntityPath), joined to a listener."""
    cs = parse_connection_string(cs) if isinstance(cs, str) else cs
    path = (path or cs.entity_path).strip("/")
    full = path + ("/" + suffix.strip("/") if suffix else "")
    url = f"wss://{_authority(cs)}/$hc/{urllib.parse.quote(full)}?" + (query + "&" if query else "") + \
        "sb-hc-action=connect"
    hdrs = list(headers) + ([] if anonymous else [("ServiceBusAuthorization", token_for(cs, path))])
    return await _open(url, hdrs, subprotocols, ssl, proxy)


async def request(cs: ConnectionString | str, method: str, target: str = "/", body: bytes = b"", *,
                  path: str = "", headers: dict | None = None, ssl: _ssl.SSLContext | None = None,
                  proxy: str | None = None, anonymous: bool = False, timeout: float = 70.0):
    """An HTTP-mode request to ``path`` (default: EntityPath) + ``target``;
    returns (status, headers, body)."""
    import urllib.request

    cs = parse_connection_string(cs) if isinstance(cs, str) else cs
    path = (path or cs.entity_path).strip("/")
    url = f"https://{_authority(cs)}/{path}{target if target.startswith('/') or not target else '/' + target}"
    hdrs = dict(headers or {})
    if not anonymous:
        hdrs["ServiceBusAuthorization"] = token_for(cs, path)
    handlers = [urllib.request.HTTPSHandler(context=ssl or _ssl.create_default_context())]
    if proxy:
        handlers.append(urllib.request.ProxyHandler({"https": proxy}))
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, data=body if body or method not in ("GET", "HEAD") else None,
                                 method=method, headers=hdrs)

    def go():
        try:
            with opener.open(req, timeout=timeout) as r:
                return r.status, dict(r.getheaders()), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers.items()), e.read()

    return await asyncio.get_running_loop().run_in_executor(None, go)


# -- listener ----------------------------------------------------------------------------------


@dataclass
class Request:
    """An HTTP-mode request a listener received."""

    method: str
    target: str
    headers: dict
    body: bytes
    remote: tuple | None = None


@dataclass
class Response:
    status: int = 200
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    description: str = ""


@dataclass
class Accept:
    """A sender that wants a WebSocket: ``await accept()`` joins it (the
    rendezvous WebSocket), ``await reject(status, description)`` refuses."""

    address: str
    id: str
    headers: dict
    remote: tuple | None
    _listener: "Listener"

    async def accept(self, subprotocol: str | None = None) -> WebSocket:
        return await _open(self.address, (), (subprotocol,) if subprotocol else (), self._listener.ssl,
                           self._listener.proxy)

    async def reject(self, status: int = 400, description: str = "Rejected") -> None:
        url = self.address + f"&sb-hc-statusCode={status}&sb-hc-statusDescription=" + \
            urllib.parse.quote(description, safe="")
        try:
            ws_ = await _open(url, (), (), self._listener.ssl, self._listener.proxy)
            await ws_.close()
        except HandshakeRefused as exc:
            if exc.status != 410:
                raise


class Listener:
    """A listener of one hybrid connection. ``on_accept(ws)`` gets each
    sender's WebSocket once joined (or ``on_connect(accept)`` decides
    itself); ``on_request(request) -> Response`` answers HTTP-mode requests.
    ``run()`` keeps the control channel up: it reconnects after a loss
    (waiting 0, 1, 2, 5, 10, then 30 s), renews its token every half
    ``TOKEN_TTL``, and stops on ``close()`` or when the relay refuses it for
    good (401, 403, 404: raised)."""

    def __init__(self, cs: ConnectionString | str, path: str = "", *, on_accept=None, on_connect=None,
                 on_request=None, ssl: _ssl.SSLContext | None = None, proxy: str | None = None,
                 listener_id: str | None = None) -> None:
        import uuid

        self.cs = parse_connection_string(cs) if isinstance(cs, str) else cs
        self.path = (path or self.cs.entity_path).strip("/")
        self.on_accept = on_accept
        self.on_connect = on_connect
        self.on_request = on_request
        self.ssl = ssl
        self.proxy = proxy
        self.id = listener_id or str(uuid.uuid4())
        self.online = asyncio.Event()
        self.connects = 0
        self._closing = False
        self._channel: WebSocket | None = None
        self._tasks: set = set()

    async def run(self) -> None:
        failures = 0
        while not self._closing:
            try:
                await self._session()
                failures = 0
            except HandshakeRefused as exc:
                if exc.status in (401, 403, 404):
                    raise
                failures += 1
            except (ConnectionError, OSError, TimeoutError, InvalidHandshake) as exc:
                log.info("control channel lost: %s", type(exc).__name__)
                failures += 1
            self.online.clear()
            if self._closing:
                break
            await asyncio.sleep(_BACKOFF[min(failures, len(_BACKOFF) - 1)] + random.random() * 0.1)

    async def close(self) -> None:
        self._closing = True
        if self._channel is not None:
            await self._channel.close()
        for t in list(self._tasks):
            t.cancel()

    async def _session(self) -> None:
        url = f"wss://{_authority(self.cs)}/$hc/{urllib.parse.quote(self.path)}?sb-hc-action=listen&sb-hc-id={self.id}"
        ch = self._channel = await _open(url, [("ServiceBusAuthorization", token_for(self.cs, self.path))], (),
                                         self.ssl, self.proxy)
        self.connects += 1
        self.online.set()
        renew = asyncio.ensure_future(self._renew(ch))
        try:
            pending = None  # a control-channel request waiting for its body
            async for msg in ch:
                if pending is not None:
                    req, pending = pending, None
                    self._spawn(self._answer(req, msg if isinstance(msg, bytes) else msg.encode(), ch, None))
                    continue
                if not isinstance(msg, str):
                    continue
                doc = orjson.loads(msg)
                if "accept" in doc:
                    self._spawn(self._accepted(doc["accept"]))
                elif "request" in doc:
                    r = doc["request"]
                    if "method" not in r:
                        self._spawn(self._rendezvous_request(r))
                    elif r.get("body"):
                        pending = r
                    else:
                        self._spawn(self._answer(r, b"", ch, None))
        finally:
            renew.cancel()

    async def _renew(self, ch: WebSocket) -> None:
        while True:
            await asyncio.sleep(TOKEN_TTL / 2)
            await ch.send(orjson.dumps({"renewToken": {"token": token_for(self.cs, self.path)}}).decode())

    def _spawn(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _accepted(self, a: dict) -> None:
        remote = a.get("remoteEndpoint")
        acc = Accept(a["address"], a.get("id", ""), a.get("connectHeaders", {}),
                     (remote["address"], remote["port"]) if remote else None, self)
        if self.on_connect is not None:
            await self.on_connect(acc)
            return
        if self.on_accept is None:
            await acc.reject(404, "No handler")
            return
        offered = [p.strip() for p in acc.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        sock = await acc.accept(offered[0] if offered else None)
        try:
            await self.on_accept(sock)
        finally:
            await sock.close()

    async def _rendezvous_request(self, r: dict) -> None:
        rv = await _open(r["address"], (), (), self.ssl, self.proxy)
        try:
            full = orjson.loads(await rv.recv())["request"]
            body = await rv.recv() if full.get("body") else b""
            await self._answer(full, body if isinstance(body, bytes) else body.encode(), rv, rv)
        finally:
            await rv.close()

    async def _answer(self, r: dict, body: bytes, ch: WebSocket, rv: WebSocket | None) -> None:
        remote = r.get("remoteEndpoint")
        req = Request(r.get("method", "GET"), r.get("requestTarget", "/"), r.get("requestHeaders", {}), body,
                      (remote["address"], remote["port"]) if remote else None)
        try:
            res = await self.on_request(req) if self.on_request is not None else Response(404)
        except Exception:
            log.exception("on_request failed")
            res = Response(500, description="the listener failed")
        head = orjson.dumps({"response": {"requestId": r["id"], "statusCode": res.status,
                                          "statusDescription": res.description or http1.REASONS.get(res.status, ""),
                                          "responseHeaders": res.headers, "body": bool(res.body)}}).decode()
        if rv is None and len(res.body) > 64 * 1024:
            rv = await _open(r["address"], (), (), self.ssl, self.proxy)  # large: over a rendezvous
            try:
                await rv.send(head)
                await rv.send(res.body)
            finally:
                await rv.close()
            return
        await ch.send(head)
        if res.body:
            await ch.send(res.body)
