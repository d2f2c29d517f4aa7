"""The event bus shared by relays through Redis (``relayd serve --redis
URL``; relayd.control.events has the interface and the in-process bus).

Theory of operation
-------------------
Every event a node publishes goes to its own subscribers at once (as on
the in-process bus) and to the Redis channel ``relayd:events`` as one JSON
document ``{"origin", "event"}``; each node subscribes to the channel and
hands its subscribers the events of other origins (its own came already).
Redis pub/sub is at most once: a node that is cut off from Redis misses
what was published meanwhile; events are notices (webhooks, claims, cuts),
the database stays the record.

Presence: while a device's tunnel is up on this node the key
``relayd:device:<id>`` holds ``{"node", "since"}`` with a TTL (default
30 s) that a refresher renews every third of it; the key is deleted when
the tunnel ends, and expires on its own when the node dies with it.

Redis being down never reaches a tunnel: publishing and presence writes are
scheduled on the loop and their failures counted in
``relayd_event_bus_errors_total{op}`` and logged (rate limited); the
subscriber reconnects with backoff. ``publish`` may be called from any
thread (the REST API's handlers run in workers).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import orjson

from relayd import metrics
from relayd.control.events import Event, Handler, _deliver
from relayd.log import RateLimitedLog

log = logging.getLogger("relayd.events")
_ERRORS = RateLimitedLog(log)

CHANNEL = "relayd:events"
KEY_PREFIX = "relayd:device:"
#: Events waiting for Redis beyond this are dropped (and counted).
MAX_PENDING = 1000


class RedisBus:
    def __init__(self, url: str, node: str, ttl: float = 30.0) -> None:
        self.url = url
        self.node = node
        self.ttl = ttl
        self.origin = secrets.token_hex(8)
        self._subs: list[tuple[Handler, asyncio.AbstractEventLoop]] = []
        self._present: dict[str, dict] = {}
        self._redis = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending: set[asyncio.Task] = set()
        #: Set while the subscriber is subscribed (tests wait on it).
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._loop = asyncio.get_running_loop()
        self._redis = aioredis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)
        self._tasks = [self._loop.create_task(self._listen()), self._loop.create_task(self._refresh())]
        log.info("event bus: redis", extra={"node": self.node, "presence_ttl": self.ttl})

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending:
            await asyncio.wait(self._pending, timeout=2)
        if self._redis is not None:
            try:
                keys = [KEY_PREFIX + d for d in self._present]
                if keys:
                    await asyncio.wait_for(self._redis.delete(*keys), 2)
            except Exception as exc:
                self._error("presence", exc)
            await self._redis.aclose()
        self._present.clear()
        self._subs.clear()

    # -- events ---------------------------------------------------------------------------------

    def subscribe(self, handler: Handler):
        entry = (handler, asyncio.get_running_loop())
        self._subs.append(entry)
        return lambda: self._subs.remove(entry) if entry in self._subs else None

    def publish(self, event: Event) -> None:
        self._hand_out(event)
        payload = orjson.dumps({"origin": self.origin, "event": event.to_doc()})
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._schedule, self._redis.publish(CHANNEL, payload), "publish")

    def _hand_out(self, event: Event) -> None:
        for handler, loop in list(self._subs):
            loop.call_soon_threadsafe(_deliver, handler, event)

    def _schedule(self, coro, op: str) -> None:
        if len(self._pending) >= MAX_PENDING:
            coro.close()
            metrics.EVENT_BUS_ERRORS.labels(op + "_dropped").inc()
            return
        task = self._loop.create_task(self._guard(coro, op))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _guard(self, coro, op: str) -> None:
        try:
            await coro
        except Exception as exc:
            self._error(op, exc)

    def _error(self, op: str, exc: BaseException) -> None:
        metrics.EVENT_BUS_ERRORS.labels(op).inc()
        _ERRORS.warning("event bus: redis %s failed: %s", op, type(exc).__name__, extra={"op": op})

    async def _listen(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                self.subscribed.set()
                backoff = 0.2
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "message":
                        self._received(msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.subscribed.clear()
                self._error("subscribe", exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _received(self, data) -> None:
        try:
            doc = orjson.loads(data)
            if doc.get("origin") == self.origin:
                return
            event = Event.from_doc(doc["event"])
            if not isinstance(event.type, str) or not isinstance(event.subject, str) \
                    or not isinstance(event.data, dict):
                raise TypeError("event fields")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            metrics.BAD_INPUT.labels("event_bus", "bad_message").inc()
            _ERRORS.warning("event bus: a message that is no event: %s", type(exc).__name__)
            return
        self._hand_out(event)

    # -- presence -------------------------------------------------------------------------------

    def present(self, device_id: str, node: str) -> None:
        doc = self._present[device_id] = {"node": node, "since": time.time()}
        self._loop.call_soon_threadsafe(
            self._schedule, self._redis.set(KEY_PREFIX + device_id, orjson.dumps(doc), ex=max(1, int(self.ttl))),
            "presence")

    def absent(self, device_id: str) -> None:
        if self._present.pop(device_id, None) is not None:
            self._loop.call_soon_threadsafe(self._schedule, self._delete_ours(device_id), "presence")

    async def _delete_ours(self, device_id: str) -> None:
        key = KEY_PREFIX + device_id
        raw = await self._redis.get(key)
        if raw is not None and orjson.loads(raw).get("node") == self.node and device_id not in self._present:
            await self._redis.delete(key)

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self._present:
                continue
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for device_id, doc in list(self._present.items()):
                        pipe.set(KEY_PREFIX + device_id, orjson.dumps(doc), ex=max(1, int(self.ttl)))
                    await pipe.execute()
            except Exception as exc:
                self._error("presence", exc)
