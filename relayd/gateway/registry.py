"""The agents connected to this node, by id and by endpoint.

In-process; the scale-out capability adds an implementation shared between
nodes behind the same methods. A newly authenticated link of an agent
replaces its old one at once (a stale session must not keep its endpoints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from relayd.net.mux import MuxConnection


@dataclass(eq=False)
class AgentSession:
    """One agent's live link."""

    agent_id: str
    serial: int
    endpoints: list[str]
    conn: MuxConnection
    address: str
    connected_since: float = field(default_factory=time.time)
    offered: list[str] = field(default_factory=list)  # what the agent offered to serve (endpoints: those configured)
    control: object = None  # the relay's ControlChannel to the agent (relayd.net.control)


class Registry(Protocol):
    """What the node needs of a registry: this in-process one, or (scale-out)
    one shared between nodes, where ``pick`` may answer with an agent linked
    to another node."""

    sessions: dict[str, AgentSession]
    by_endpoint: dict[str, list[AgentSession]]  # each endpoint's sessions on this node (the metrics count them)
    on_added: list[Callable[[AgentSession], None]]

    def get(self, agent_id: str) -> AgentSession | None: ...
    def add(self, sess: AgentSession) -> AgentSession | None: ...
    def remove(self, sess: AgentSession) -> bool: ...
    def set_endpoints(self, names: Iterable[str]) -> None: ...
    def pick(self, endpoint: str) -> AgentSession | None: ...
    def __len__(self) -> int: ...


class AgentRegistry:
    """The in-process registry (``Registry``)."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        self.sessions: dict[str, AgentSession] = {}
        self.by_endpoint: dict[str, list[AgentSession]] = {name: [] for name in endpoints}
        #: Called with each session added (the stream seam serves its waiters).
        self.on_added: list[Callable[[AgentSession], None]] = []

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, agent_id: str) -> AgentSession | None:
        return self.sessions.get(agent_id)

    def add(self, sess: AgentSession) -> AgentSession | None:
        """Register ``sess``; returns the session of the same agent it
        replaced (still open: the caller closes it), or None."""
        old = self.sessions.get(sess.agent_id)
        if old is not None:
            self.remove(old)
        self.sessions[sess.agent_id] = sess
        for e in sess.endpoints:
            self.by_endpoint.setdefault(e, []).append(sess)
        for cb in self.on_added:
            cb(sess)
        return old

    def remove(self, sess: AgentSession) -> bool:
        """Unregister ``sess``; True if it was the agent's current session."""
        current = self.sessions.get(sess.agent_id) is sess
        if current:
            del self.sessions[sess.agent_id]
        for e in sess.endpoints:
            lst = self.by_endpoint.get(e)
            if lst and sess in lst:
                lst.remove(sess)
        return current

    def set_endpoints(self, names: Iterable[str]) -> None:
        """The node's endpoints changed (reload): each session serves what it
        offered of the new set, without reconnecting."""
        names = set(names)
        self.by_endpoint = {name: [] for name in names}
        for sess in self.sessions.values():
            sess.endpoints = [e for e in sess.offered if e in names]
            for e in sess.endpoints:
                self.by_endpoint[e].append(sess)

    def pick(self, endpoint: str) -> AgentSession | None:
        """A live agent serving ``endpoint`` that takes new streams (not
        draining): the one with the fewest open streams."""
        best = None
        for s in self.by_endpoint.get(endpoint, ()):
            if s.conn.accepting_streams and (best is None or s.conn.stream_count() < best.conn.stream_count()):
                best = s
        return best
