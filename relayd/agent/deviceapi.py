"""The agent's local forwarder of the device API (``agent.device_api``,
``--device-api 127.0.0.1:PORT``): services on the device call
``http://127.0.0.1:PORT/api/v1/device/...`` with no credential, and the
agent carries each call through its tunnel with the device token the relay
pushed it (relayd.gateway.devicegw has the message format).

One request per connection (``Connection: close``), HTTP/1.1 with a
``Content-Length`` body of at most 64 KiB (a bigger one is refused with 413
before it is read; a chunked one with 411). An ``Authorization`` header of
the caller is dropped: the credential is the agent's. Without a token yet,
or without a link, the answer is 503; the relay's answer not within the
timeout is a 504. Whoever reaches this port speaks as the device, so it
listens on loopback only (the configuration refuses anything else).
"""

from __future__ import annotations

import asyncio
import itertools
import logging

from relayd.control.devicegw import CHUNK, MAX_BODY
from relayd.core import http1
from relayd.errors import ProtocolError

log = logging.getLogger("relayd.agent")

HEAD_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024
PREFIX = b"/api/v1/device/"


class DeviceApiForwarder:
    """``agent`` is the AgentNode (its ``push``, ``device_token`` and
    ``on_control``); ``timeout`` bounds the relay's answer."""

    def __init__(self, agent, timeout: float = 15.0) -> None:
        self.agent = agent
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._server: asyncio.AbstractServer | None = None
        agent.on_control("device_api_reply", self._on_reply)

    @property
    def port(self) -> int | None:
        return self._server.sockets[0].getsockname()[1] if self._server else None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        log.info("device API forwarder listening", extra={"address": f"{host}:{self.port}"})

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for fut in self._waiting.values():
            fut.cancel()

    def _on_reply(self, msg: dict) -> None:
        fut = self._waiting.pop(msg.get("id"), None) if type(msg.get("id")) is int else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body, headers = await self._call(reader)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        try:
            writer.write(http1.response(status, body, ctype.encode("latin-1", "replace"), headers=headers))
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _error(status: int, code: str, message: str):
        r = http1.error_reply(status, code, message)
        return status, "application/json", r.body, []

    async def _call(self, reader: asyncio.StreamReader):
        async with asyncio.timeout(HEAD_TIMEOUT):
            raw = await reader.readuntil(b"\r\n\r\n")
        try:
            head = http1.parse_request_head(raw)
        except ProtocolError:
            return self._error(400, "bad_request", "not an HTTP/1.1 request")
        if not head.path.startswith(PREFIX):
            return self._error(404, "not_found", "this port serves /api/v1/device/... only")
        if head.get(b"transfer-encoding") is not None:
            return self._error(411, "length_required", "send the body with Content-Length")
        cl = head.get(b"content-length") or b"0"
        if not cl.isdigit() or len(cl) > 12:
            return self._error(400, "bad_request", "bad Content-Length")
        if int(cl) > MAX_BODY:
            return self._error(413, "too_large", f"the body is over {MAX_BODY // 1024} KiB")
        async with asyncio.timeout(HEAD_TIMEOUT):
            body = await reader.readexactly(int(cl))
        token = self.agent.device_token
        if token is None or self.agent.conn is None:
            return self._error(503, "unavailable", "the device has no link to the relay, or no device token yet")
        cid = next(self._ids)
        fut = self._waiting[cid] = asyncio.get_running_loop().create_future()
        try:
            first = {"method": head.method.decode("latin-1"), "path": head.target.decode("latin-1"),
                     "content_type": (head.get(b"content-type") or b"").decode("latin-1"), "token": token}
            pieces = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
            for i, piece in enumerate(pieces):
                fields = first if i == 0 else {}
                if not await self.agent.push("device_api", id=cid, body=piece, more=i < len(pieces) - 1, **fields):
                    return self._error(503, "unavailable", "the link to the relay broke")
            try:
                msg = await asyncio.wait_for(fut, self.timeout)
            except asyncio.TimeoutError:
                return self._error(504, "timeout", "the relay did not answer in time")
        finally:
            self._waiting.pop(cid, None)
        headers = [(str(k).encode("latin-1", "replace"), str(v).encode("latin-1", "replace"))
                   for k, v in msg.get("headers") or () if str(k).lower() in ("retry-after", "www-authenticate")]
        status = msg.get("status") if type(msg.get("status")) is int and 100 <= msg.get("status") < 600 else 502
        return (status, str(msg.get("content_type") or "application/json"),
                msg.get("body") if isinstance(msg.get("body"), bytes) else b"", headers)
