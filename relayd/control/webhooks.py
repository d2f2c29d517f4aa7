"""Notifications (issue 13 item 6; ../shared/specs/device-cloud.md section
7.7): users' webhooks, and the delivery of device events to them.

Theory of operation
-------------------
A user registers a webhook (``POST /api/v1/webhooks``): a URL, the event
types it wants, and optionally the devices; the relay makes its secret
(``whsec_`` + base64 of 24 random bytes, Standard Webhooks' form) and shows
it once in the answer. The database keeps the secret itself, because every
delivery is signed with it: the data directory is as secret as the CA key.

``Notifier`` subscribes to the event bus (relayd.control.events). For each
event it finds the webhooks that want it and whose user may see the device
(owner, or any share), and queues one delivery per webhook. A delivery is
a CloudEvents 1.0 structured JSON document (``application/cloudevents+json``)
POSTed with Standard Webhooks' headers: ``webhook-id`` (the event's id, the
same on every retry, so receivers can drop duplicates), ``webhook-timestamp``
(the attempt's, seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256 of
id.timestamp.body>``. A 2xx answer is delivered; anything else (another
status, a timeout, a refused connection) is retried with exponential backoff
and jitter, for at most 24 hours after the event. Before every attempt the
webhook must still exist and its user still see the device: a revoked share
stops deliveries that are already queued. Redirects are not followed.

The queue is in memory and bounded (``WebhookLimits.max_pending``; past it a
new delivery is dropped and counted): the webhooks survive a restart, the
deliveries waiting for a retry do not.

Delivery goes through ``PushSender`` plug-ins, one per kind of target;
``WebhookSender`` is the one built in. FCM (HTTP v1) or SNS senders plug in
the same way (``Notifier.senders``) behind the same event stream.

Every attempt is counted in ``relayd_webhook_deliveries_total{result}``
(delivered, failed, gave_up, dropped, not_visible); log lines name the
webhook and the event, never the secret or the body.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import secrets
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Protocol

import orjson

from relayd import metrics
from relayd.control.api import JSON, ApiError, Op, Request, listing, no_content, not_found, ok, rfc3339
from relayd.control.events import DEVICE_CONNECTED, DEVICE_DISCONNECTED, DEVICE_NOTIFICATION, Event
from relayd.errors import ConfigError

log = logging.getLogger("relayd.webhooks")

EVENTS = (DEVICE_NOTIFICATION, DEVICE_CONNECTED, DEVICE_DISCONNECTED)
SECRET_PREFIX = "whsec_"
MAX_HOOKS_PER_USER = 32


@dataclass
class WebhookLimits:
    max_pending: int = 10_000  # deliveries queued or in flight
    concurrency: int = 16  # attempts at once
    timeout: float = 10.0  # one attempt, connect to answer
    first_retry: float = 5.0  # seconds; doubles at each retry
    max_retry: float = 3600.0  # the longest wait between two attempts
    max_age: float = 24 * 3600.0  # after the event, no more attempts


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' signature header value (``v1,<base64>``)."""
    key = base64.b64decode(secret[len(SECRET_PREFIX):])
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def cloudevent(event: Event) -> bytes:
    """The event as a CloudEvents 1.0 structured-mode JSON document."""
    return orjson.dumps({"specversion": "1.0", "id": event.id, "source": f"relayd://devices/{event.subject}",
                         "type": "dev.relayd." + event.type, "subject": event.subject, "time": rfc3339(event.time),
                         "datacontenttype": "application/json", "data": event.data})


def check_url(url) -> str:
    """A webhook URL: https, or plain http to a loopback address only; no
    credentials or fragment in it."""
    if not isinstance(url, str) or len(url) > 2048:
        raise ConfigError("url: an https URL of at most 2048 characters")
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        raise ConfigError("url: not a URL") from None
    if u.scheme not in ("https", "http") or not u.hostname or u.username or u.password or u.fragment:
        raise ConfigError("url: an https URL with a host, without user, password or fragment")
    if u.scheme == "http":
        try:
            loop = ipaddress.ip_address(u.hostname).is_loopback
        except ValueError:
            loop = u.hostname == "localhost"
        if not loop:
            raise ConfigError("url: https (plain http only to a loopback address)")
    del port
    return url


class WebhookStore:
    """dc_webhooks, and who sees which device (dc_devices owners and
    dc_shares). One short transaction per call."""

    def __init__(self, store) -> None:
        self.store = store

    def create(self, user_id: str, url: str, events: list[str], device_ids: list[str] | None) -> dict:
        hook = {"id": "wh_" + secrets.token_hex(8), "url": url, "events": events, "device_ids": device_ids,
                "created_at": time.time()}
        secret = new_secret()
        with self.store.transaction() as db:
            (n,) = db.execute("SELECT COUNT(*) FROM dc_webhooks WHERE user_id = ?", (user_id,)).fetchone()
            if n >= MAX_HOOKS_PER_USER:
                raise ApiError(409, "too_many", f"a user has at most {MAX_HOOKS_PER_USER} webhooks")
            db.execute("INSERT INTO dc_webhooks(id, user_id, url, secret, events, device_ids, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (hook["id"], user_id, url, secret, json.dumps(events),
                        None if device_ids is None else json.dumps(device_ids), hook["created_at"]))
        return {**hook, "secret": secret}

    _COLS = "id, user_id, url, secret, events, device_ids, created_at"

    def _row(self, r) -> dict:
        return {"id": r[0], "user_id": r[1], "url": r[2], "secret": r[3], "events": json.loads(r[4]),
                "device_ids": None if r[5] is None else json.loads(r[5]), "created_at": r[6]}

    def list(self, user_id: str) -> list[dict]:
        return [self._row(r) for r in self.store.query(
            f"SELECT {self._COLS} FROM dc_webhooks WHERE user_id = ? ORDER BY created_at, id", (user_id,))]

    def get(self, hook_id: str) -> dict | None:
        rows = self.store.query(f"SELECT {self._COLS} FROM dc_webhooks WHERE id = ?", (hook_id,))
        return self._row(rows[0]) if rows else None

    def delete(self, user_id: str, hook_id: str) -> bool:
        with self.store.transaction() as db:
            return db.execute("DELETE FROM dc_webhooks WHERE id = ? AND user_id = ?", (hook_id, user_id)).rowcount > 0

    def can_see(self, user_id: str, device_id: str) -> bool:
        return bool(self.store.query(
            "SELECT 1 FROM dc_devices WHERE id = ? AND owner = ?"
            " UNION SELECT 1 FROM dc_shares WHERE device_id = ? AND user_id = ?",
            (device_id, user_id, device_id, user_id)))

    def targets(self, event: Event) -> list[dict]:
        """The webhooks that want ``event`` and whose user sees its device."""
        rows = self.store.query(
            f"SELECT {self._COLS} FROM dc_webhooks w WHERE EXISTS (SELECT 1 FROM dc_devices d WHERE d.id = ?"
            " AND d.owner = w.user_id) OR EXISTS (SELECT 1 FROM dc_shares s WHERE s.device_id = ?"
            " AND s.user_id = w.user_id) ORDER BY created_at, id", (event.subject, event.subject))
        hooks = [self._row(r) for r in rows]
        return [h for h in hooks if event.type in h["events"]
                and (h["device_ids"] is None or event.subject in h["device_ids"])]


class DeliveryFailed(Exception):
    """One attempt failed; the message says why (no body, no secret)."""


class PushSender(Protocol):
    """One kind of target (webhook; FCM, SNS later). ``send`` makes one
    attempt and raises DeliveryFailed when it should be retried."""

    kind: str

    async def send(self, target: dict, event: Event) -> None: ...


class WebhookSender:
    """Standard Webhooks over HTTP/1.1, one connection per attempt."""

    kind = "webhook"

    def __init__(self, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self.ssl = ssl_context or ssl.create_default_context()

    async def send(self, target: dict, event: Event) -> None:
        body = cloudevent(event)
        ts = int(time.time())
        u = urllib.parse.urlsplit(target["url"])
        https = u.scheme == "https"
        port = u.port or (443 if https else 80)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = u.hostname if ":" not in u.hostname else f"[{u.hostname}]"
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: relayd-webhooks\r\n"
                f"Content-Type: application/cloudevents+json\r\nContent-Length: {len(body)}\r\n"
                f"webhook-id: {event.id}\r\nwebhook-timestamp: {ts}\r\n"
                f"webhook-signature: {sign(target['secret'], event.id, ts, body)}\r\nConnection: close\r\n\r\n")
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(u.hostname, port, ssl=self.ssl if https else None,
                                                               limit=16 * 1024)
                writer.write(head.encode("latin-1") + body)
                line = await reader.readline()
        except TimeoutError:
            raise DeliveryFailed("timeout") from None
        except (OSError, ValueError, UnicodeError) as exc:
            raise DeliveryFailed(type(exc).__name__) from None
        finally:
            if writer is not None:
                writer.close()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise DeliveryFailed("not an HTTP answer")
        status = int(parts[1])
        if not 200 <= status < 300:
            raise DeliveryFailed(f"status {status}")


class Notifier:
    """Events from ``bus`` to the webhooks of ``hooks`` (a WebhookStore),
    through ``senders`` (kind -> PushSender)."""

    def __init__(self, hooks: WebhookStore, bus, limits: WebhookLimits | None = None,
                 senders: dict | None = None) -> None:
        self.hooks = hooks
        self.bus = bus
        self.limits = limits or WebhookLimits()
        self.senders: dict[str, PushSender] = senders or {"webhook": WebhookSender(self.limits.timeout)}
        self._sem = asyncio.Semaphore(self.limits.concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._unsubscribe = None

    def start(self) -> None:
        self._unsubscribe = self.bus.subscribe(self._on_event)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for t in list(self._tasks):
            t.cancel()
        metrics.WEBHOOK_PENDING.set(0)

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        metrics.WEBHOOK_PENDING.set(len(self._tasks))

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        metrics.WEBHOOK_PENDING.set(len(self._tasks))

    def _on_event(self, event: Event) -> None:
        if event.type in EVENTS:
            self._spawn(self._fan_out(event))

    async def _fan_out(self, event: Event) -> None:
        try:
            targets = await asyncio.to_thread(self.hooks.targets, event)
        except Exception:
            log.exception("webhook lookup failed", extra={"event": event.id})
            return
        for hook in targets:
            if len(self._tasks) >= self.limits.max_pending:
                metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
                log.warning("webhook queue full: delivery dropped", extra={"webhook": hook["id"], "event": event.id})
                continue
            self._spawn(self._deliver(hook, event))

    async def _deliver(self, hook: dict, event: Event) -> None:
        sender = self.senders[hook.get("kind", "webhook")]
        attempt = 0
        while True:
            current = await asyncio.to_thread(self.hooks.get, hook["id"])
            if current is None or not await asyncio.to_thread(self.hooks.can_see, current["user_id"], event.subject):
                metrics.WEBHOOK_DELIVERIES.labels("not_visible").inc()
                return
            async with self._sem:
                try:
                    await sender.send(current, event)
                except DeliveryFailed as exc:
                    reason = str(exc)
                else:
                    metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
                    log.info("webhook delivered", extra={"webhook": hook["id"], "event": event.id,
                                                         "attempt": attempt + 1})
                    return
            metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
            delay = min(self.limits.first_retry * 2 ** attempt, self.limits.max_retry) * random.uniform(0.5, 1.0)
            attempt += 1
            if time.time() + delay - event.time > self.limits.max_age:
                metrics.WEBHOOK_DELIVERIES.labels("gave_up").inc()
                log.warning("webhook delivery given up", extra={"webhook": hook["id"], "event": event.id,
                                                                "attempts": attempt, "error": reason})
                return
            log.info("webhook delivery failed, retrying", extra={"webhook": hook["id"], "event": event.id,
                                                                  "attempt": attempt, "error": reason,
                                                                  "retry_in_s": round(delay, 2)})
            await asyncio.sleep(delay)


# -- the REST API -----------------------------------------------------------------------------------

TAG = "webhooks"
_ID = {"type": "string", "pattern": "^wh_[0-9a-f]{16}$", "description": "a webhook id, wh_ and 16 hex digits"}
SCHEMAS = {
    "WebhookNew": {
        "type": "object", "additionalProperties": False, "required": ["url"],
        "properties": {
            "url": {"type": "string", "minLength": 8, "maxLength": 2048,
                    "description": "https (plain http to a loopback address only)"},
            "events": {"type": "array", "minItems": 1, "maxItems": len(EVENTS), "items": {"enum": list(EVENTS)},
                       "description": "the event types to deliver (default: all)"},
            "device_ids": {"type": ["array", "null"], "maxItems": 256,
                           "items": {"type": "string", "minLength": 1, "maxLength": 128},
                           "description": "only these devices (null: every device the user can see)"}}},
    "Webhook": {
        "type": "object", "required": ["id", "url", "events", "device_ids", "created_at"],
        "properties": {"id": {"type": "string"}, "url": {"type": "string"},
                       "events": {"type": "array", "items": {"type": "string"}},
                       "device_ids": {"type": ["array", "null"], "items": {"type": "string"}},
                       "created_at": {"type": "string"},
                       "secret": {"type": "string", "description": "whsec_...: in the answer to POST only"}}},
}


def _public(hook: dict, secret: bool = False) -> dict:
    out = {k: hook[k] for k in ("id", "url", "events", "device_ids")}
    out["created_at"] = rfc3339(hook["created_at"])
    if secret:
        out["secret"] = hook["secret"]
    return out


def no_user_auth(head, cred) -> str:
    raise ApiError(401, "unauthorized", "user sign-in for the device API is not configured on this relay",
                   ((b"WWW-Authenticate", b'Bearer realm="relayd"'),))


class WebhookResources:
    """``/api/v1/webhooks``. ``user_auth(head, cred)`` returns the calling
    user's id (dc_users.id) or raises ApiError 401: the device API's one
    user-authentication function, set by whoever serves user sign-in."""

    def __init__(self, hooks: WebhookStore, user_auth=no_user_auth) -> None:
        self.hooks = hooks
        self.user_auth = user_auth

    def authenticate(self, head, cred):
        return self.user_auth(head, cred)

    def ops(self) -> list[Op]:
        ref = {"$ref": "#/components/schemas/Webhook"}
        common = dict(tag=TAG, auth=self.authenticate, security="userToken")
        return [
            Op("POST", "/webhooks", self.create, "createWebhook", "Register a webhook", body={
                "$ref": "#/components/schemas/WebhookNew"}, responses={201: ("Registered; the secret is shown "
                                                                             "this once", ref, (JSON,))},
               errors=(409, 422), write=True, **common,
               description="Deliveries are CloudEvents 1.0 (structured JSON), signed as Standard Webhooks "
                           "specify with the secret; device_ids must be devices the user can see."),
            Op("GET", "/webhooks", self.list, "listWebhooks", "The user's webhooks",
               responses={200: ("The webhooks (no secrets)", listing(ref), (JSON,))}, **common),
            Op("GET", "/webhooks/{id}", self.get, "getWebhook", "One webhook", params={"id": _ID},
               responses={200: ("The webhook (no secret)", ref, (JSON,))}, **common),
            Op("DELETE", "/webhooks/{id}", self.delete, "deleteWebhook", "Remove a webhook", params={"id": _ID},
               responses={204: ("Removed; queued deliveries stop", None, ())}, write=True, **common),
        ]

    def create(self, req: Request):
        user = req.principal
        doc = req.body
        url = check_url(doc["url"])
        events = list(dict.fromkeys(doc.get("events") or EVENTS))
        devices = doc.get("device_ids")
        if devices is not None:
            devices = list(dict.fromkeys(devices))
            hidden = [d for d in devices if not self.hooks.can_see(user, d)]
            if hidden:
                # the same answer for a device that does not exist and one of someone else's
                raise ConfigError("device_ids: only devices you can see")
        hook = self.hooks.create(user, url, events, devices)
        req.target = hook["id"]
        return ok(_public(hook, secret=True), 201)

    def list(self, req: Request):
        return ok({"items": [_public(h) for h in self.hooks.list(req.principal)]})

    def _mine(self, req: Request) -> dict:
        hook = self.hooks.get(req.params["id"])
        if hook is None or hook["user_id"] != req.principal:
            raise not_found("webhook")
        return hook

    def get(self, req: Request):
        return ok(_public(self._mine(req)))

    def delete(self, req: Request):
        self._mine(req)
        self.hooks.delete(req.principal, req.params["id"])
        return no_content()
