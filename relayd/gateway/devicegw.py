"""The relay's side of the device gateway (relayd.control.devicegw): device
tokens pushed down the tunnel, and the calls an agent's local forwarder
(relayd.agent.deviceapi) carries up it.

Tokens: when a device's tunnel comes up the relay pushes ``{"type":
"device_token", "token", "expires_at"}`` on its control stream, then again
every half-life while that same link lives; the task ends with the link.

Forwarded calls: the agent sends ``device_api`` control messages, ``{"id",
"method", "path", "content_type", "token", "body", "more"}``; a body larger
than one control message comes in pieces (``more`` true until the last one,
later pieces carry only id, body and more). The call then goes through the
REST API's one dispatcher (relayd.control.api.Api.handle) as if it came in
on the HTTPS port, with the link's device as ``cred["link"]``: the token
must name that device. The answer goes back as ``{"type":
"device_api_reply", "id", "status", "content_type", "body"}``. What one
link may have assembling at once is bounded (calls and bytes); a call past
the bounds is answered 413 or 429 without being assembled.
"""

from __future__ import annotations

import asyncio
import logging

from relayd import metrics
from relayd.control.api import rfc3339
from relayd.control.devicegw import MAX_BODY
from relayd.core import http1
from relayd.gateway.registry import AgentSession

log = logging.getLogger("relayd.devicegw")

#: Calls one link may have assembling or in the dispatcher at once.
MAX_PENDING = 8
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class DeviceLinks:
    """``push(agent_id, type, **fields)`` sends a control message,
    ``db(name, *args)`` runs a store call off the loop, ``api`` is the REST
    API, ``tokens`` the DeviceTokens."""

    def __init__(self, push, db, api, tokens) -> None:
        self.push = push
        self.db = db
        self.api = api
        self.tokens = tokens
        self._refresh: dict[str, asyncio.Task] = {}  # agent id -> its token task
        self._pending: dict[str, dict[int, dict]] = {}  # agent id -> call id -> call being assembled
        self._busy: dict[str, int] = {}

    # -- tokens ---------------------------------------------------------------------------------

    def link_changed(self, sess: AgentSession, up: bool) -> None:
        """AgentPort.on_link: start or stop the token pushes of that link."""
        old = self._refresh.pop(sess.agent_id, None)
        if old is not None:
            old.cancel()
        self._pending.pop(sess.agent_id, None)
        if up:
            self._refresh[sess.agent_id] = asyncio.get_running_loop().create_task(self._tokens(sess))

    async def _tokens(self, sess: AgentSession) -> None:
        try:
            if not await self.db("query", "SELECT 1 FROM dc_devices WHERE id = ?", (sess.agent_id,)):
                return  # an agent that is not a device gets no token
            when = "connect"
            while not sess.conn.closed:
                token, exp = self.tokens.issue(sess.agent_id)
                if await self.push(sess.agent_id, "device_token", token=token, expires_at=rfc3339(exp)):
                    metrics.DEVICE_TOKENS.labels(when).inc()
                    log.info("device token pushed", extra={"agent": sess.agent_id, "when": when})
                when = "refresh"
                await asyncio.sleep(self.tokens.ttl / 2)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("device token push failed", extra={"agent": sess.agent_id})
        finally:
            if self._refresh.get(sess.agent_id) is asyncio.current_task():
                del self._refresh[sess.agent_id]

    def stop(self) -> None:
        for t in self._refresh.values():
            t.cancel()
        self._refresh.clear()

    # -- forwarded calls ----------------------------------------------------------------------------

    def on_call(self, agent_id: str, msg: dict) -> None:
        """AgentPort.on_control("device_api")."""
        cid = msg.get("id")
        body = msg.get("body", b"")
        if type(cid) is not int or not isinstance(body, bytes):
            metrics.BAD_INPUT.labels("device_api", "bad_message").inc()
            return
        calls = self._pending.setdefault(agent_id, {})
        call = calls.get(cid)
        if call is None:
            method, path = msg.get("method"), msg.get("path")
            if method not in _METHODS or not isinstance(path, str) or not path.startswith("/api/v1/device/") \
                    or len(path) > 2048:
                metrics.BAD_INPUT.labels("device_api", "bad_message").inc()
                return self._reply(agent_id, cid, 400, "bad_request", "not a device API call")
            if len(calls) + self._busy.get(agent_id, 0) >= MAX_PENDING:
                metrics.DEVICE_API_REFUSALS.labels("rate").inc()
                return self._reply(agent_id, cid, 429, "too_many_requests", "too many calls at once")
            call = calls[cid] = {"method": method, "path": path, "body": bytearray(),
                                 "ct": msg.get("content_type") if isinstance(msg.get("content_type"), str) else "",
                                 "token": msg.get("token") if isinstance(msg.get("token"), str) else ""}
        if len(call["body"]) <= MAX_BODY:  # one byte past the limit is enough for the 413
            call["body"] += body[:MAX_BODY + 1 - len(call["body"])]
        if msg.get("more"):
            return
        del calls[cid]
        self._busy[agent_id] = self._busy.get(agent_id, 0) + 1
        asyncio.get_running_loop().create_task(self._dispatch(agent_id, cid, call))

    async def _dispatch(self, agent_id: str, cid: int, call: dict) -> None:
        try:
            headers = [(b"content-type", call["ct"].encode("latin-1", "replace")[:256])]
            if call["token"]:
                headers.append((b"authorization", b"Bearer " + call["token"].encode("latin-1", "replace")[:8192]))
            head = http1.RequestHead(call["method"].encode(), call["path"].encode("utf-8", "replace"), b"HTTP/1.1",
                                     headers)
            reply = await asyncio.to_thread(self.api.handle, call["method"], call["path"], head,
                                            bytes(call["body"]), f"device:{agent_id}", {"link": agent_id})
            await self.push(agent_id, "device_api_reply", id=cid, status=reply.status,
                            content_type=reply.content_type.decode("latin-1"), body=bytes(reply.body),
                            headers=[[k.decode("latin-1"), v.decode("latin-1")] for k, v in reply.headers
                                     if k.lower() in (b"retry-after", b"www-authenticate")])
        finally:
            self._busy[agent_id] -= 1
            if not self._busy[agent_id]:
                del self._busy[agent_id]

    def _reply(self, agent_id: str, cid, status: int, code: str, message: str) -> None:
        r = http1.error_reply(status, code, message)
        asyncio.get_running_loop().create_task(
            self.push(agent_id, "device_api_reply", id=cid if type(cid) is int else -1, status=status,
                      content_type="application/json", body=bytes(r.body), headers=[]))
