"""The device cloud's events (issue 13; ../shared/specs/device-cloud.md
sections 7.3 and 7.7): ``device.connected``, ``device.disconnected``,
``device.notification`` and what later capabilities add.

One interface, two buses. ``LocalBus`` delivers within this process (one
relay); the Redis bus (``--redis URL``) delivers to every relay sharing that
Redis and keeps a presence key per online device. Producers call
``publish``; consumers (claim codes, webhooks, the registry's view of who is
online where) ``subscribe`` a callback, which runs on the event loop that
subscribed it, in publishing order, and must not block. An exception in one
consumer is counted and logged, and never reaches the producer or the other
consumers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

DEVICE_CONNECTED = "device.connected"
DEVICE_DISCONNECTED = "device.disconnected"
DEVICE_NOTIFICATION = "device.notification"
#: Between relays only (no webhook gets them): a device was claimed (its
#: relay tells the agent) or deleted (its relay cuts the tunnel).
DEVICE_CLAIMED = "device.claimed"
DEVICE_DELETED = "device.deleted"


@dataclass(frozen=True)
class Event:
    type: str  # one of the names above
    subject: str  # the device id
    data: dict = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    time: float = field(default_factory=time.time)

    def to_doc(self) -> dict:
        return {"type": self.type, "subject": self.subject, "data": self.data, "id": self.id, "time": self.time}

    @classmethod
    def from_doc(cls, doc: dict) -> "Event":
        return cls(doc["type"], doc["subject"], doc.get("data", {}), doc["id"], doc["time"])


Handler = Callable[[Event], None]


class Bus(Protocol):
    def publish(self, event: Event) -> None: ...

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        """Returns the function that unsubscribes ``handler``."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def present(self, device_id: str, node: str) -> None:
        """The device's tunnel is up on ``node`` (presence, kept fresh
        until ``absent``)."""
        ...

    def absent(self, device_id: str) -> None: ...


class LocalBus:
    """Events within this process. ``publish`` may be called from any
    thread; each handler runs on the loop it was subscribed from."""

    def __init__(self) -> None:
        self._subs: list[tuple[Handler, asyncio.AbstractEventLoop]] = []

    def publish(self, event: Event) -> None:
        for handler, loop in list(self._subs):
            loop.call_soon_threadsafe(_deliver, handler, event)

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        entry = (handler, asyncio.get_running_loop())
        self._subs.append(entry)
        return lambda: self._subs.remove(entry) if entry in self._subs else None

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._subs.clear()

    def present(self, device_id: str, node: str) -> None:
        pass  # one node: the registry is the presence

    def absent(self, device_id: str) -> None:
        pass


def _deliver(handler: Handler, event: Event) -> None:
    try:
        handler(event)
    except Exception as exc:  # one consumer's bug stays its own
        from relayd.log import caught

        caught("event_handler", exc, event=event.type)
