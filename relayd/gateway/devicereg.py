"""The relay's side of the device registry (relayd.control.devices):
connection events, presence, claim codes pushed down device tunnels, and
the cuts and notices other nodes ask for over the event bus.

A link that comes up (AgentPort.on_link) is looked up in the store off the
loop; an agent without a dc_devices row is no device and makes no event.
For a device: its node is recorded, ``device.connected {device_id, node,
remote_addr, at}`` is published, its presence set, and, while it is
unclaimed, its claim code pushed as ``{"type": "claim_code", "code"}`` (the
agent answers ``{"type": "ack", "of": "claim_code"}``). The link's end
publishes ``device.disconnected {device_id, node, at, reason}`` and drops
the presence. ``device.claimed`` (from any node) makes the node holding the
tunnel push ``{"type": "claimed"}``; ``device.deleted`` makes it cut the
tunnel at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from relayd import metrics
from relayd.control.devices import DeviceStore, claim_code, code_hash
from relayd.control.events import DEVICE_CLAIMED, DEVICE_CONNECTED, DEVICE_DELETED, DEVICE_DISCONNECTED, Event
from relayd.gateway.registry import AgentSession

log = logging.getLogger("relayd.devices")


class DeviceRegistry:
    """``db`` runs a store call off the loop (AsyncStore), ``push(agent_id,
    type, **fields)`` sends a control message, ``registry`` is the node's
    AgentRegistry, ``claim_key`` the data directory's claim-code key."""

    def __init__(self, db, bus, push, registry, node: str, claim_key: bytes) -> None:
        self.db = db
        self.bus = bus
        self.push = push
        self.registry = registry
        self.node = node
        self.claim_key = claim_key
        self._up: set[AgentSession] = set()  # device links whose connected event went out
        self._tasks: set[asyncio.Task] = set()
        self._unsubscribe = None

    def start(self) -> None:
        self._unsubscribe = self.bus.subscribe(self._on_event)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        for t in self._tasks:
            t.cancel()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def link_changed(self, sess: AgentSession, up: bool) -> None:
        """AgentPort.on_link."""
        if up:
            self._spawn(self._link_up(sess))
        elif sess in self._up:
            self._up.discard(sess)
            metrics.DEVICES_ONLINE.dec()
            err = sess.conn.error
            reason = "revoked" if getattr(sess, "revoked", False) else (type(err).__name__ if err else "closed")
            self._publish(Event(DEVICE_DISCONNECTED, sess.agent_id, {
                "device_id": sess.agent_id, "node": self.node, "at": time.time(), "reason": reason}))
            if self.registry.get(sess.agent_id) is None:
                self.bus.absent(sess.agent_id)

    def _publish(self, event: Event) -> None:
        metrics.DEVICE_EVENTS.labels(event.type).inc()
        log.info("device event", extra={"event": event.type, "device": event.subject})
        self.bus.publish(event)

    async def _link_up(self, sess: AgentSession) -> None:
        try:
            info = await self.db.run(lambda store: DeviceStore(store).link_info(sess.agent_id))
            if info is None or sess.conn.closed:
                return  # no device, or gone meanwhile
            claimed, stored = info
            code = None if claimed else claim_code(self.claim_key, sess.agent_id)
            await self.db.run(lambda store: DeviceStore(store).link_up(
                sess.agent_id, self.node, code_hash(code) if code and stored is None else None))
            if sess.conn.closed or self.registry.get(sess.agent_id) is not sess:
                return
            self._up.add(sess)
            metrics.DEVICES_ONLINE.inc()
            self._publish(Event(DEVICE_CONNECTED, sess.agent_id, {
                "device_id": sess.agent_id, "node": self.node, "remote_addr": sess.address,
                "at": sess.connected_since}))
            self.bus.present(sess.agent_id, self.node)
            if code is not None and await self.push(sess.agent_id, "claim_code", code=code):
                metrics.CLAIM_CODES.labels("pushed").inc()
                log.info("claim code pushed", extra={"device": sess.agent_id})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("device link bookkeeping failed", extra={"device": sess.agent_id})

    def on_ack(self, agent_id: str, msg: dict) -> None:
        """AgentPort.on_control("ack")."""
        if msg.get("of") == "claim_code":
            metrics.CLAIM_CODES.labels("acked").inc()
            log.info("claim code stored by the device", extra={"device": agent_id})
        else:
            metrics.BAD_INPUT.labels("agent_link", "bad_ack").inc()

    def _on_event(self, event: Event) -> None:
        sess = self.registry.get(event.subject)
        if sess is None:
            return
        if event.type == DEVICE_CLAIMED:
            self._spawn(self._claimed(event.subject))
        elif event.type == DEVICE_DELETED:
            log.warning("device deleted: cutting its tunnel", extra={"device": event.subject})
            sess.revoked = True
            sess.conn.abort()

    async def _claimed(self, device_id: str) -> None:
        if await self.push(device_id, "claimed"):
            metrics.CLAIM_CODES.labels("claimed_pushed").inc()
