"""Every limit of the multiplexer core in one place, each with a safe default."""

from __future__ import annotations

from dataclasses import dataclass

from relayd.errors import ConfigError

#: yamux fixes the initial window of every stream at 256 KiB on both sides;
#: a peer assumes it, so it is a protocol constant, not a setting.
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW_LIMIT = 0xFFFFFFFF
#: Receive budgets are byte counts far beyond any window (1 TiB).
MAX_BUDGET = 1 << 40


def _checker(cfg, table: str):
    """``need(ok, name, why)``: a ConfigError naming ``table.name`` unless ok."""

    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{table}.{name}: {why} (got {getattr(cfg, name)!r})")

    return need


@dataclass(frozen=True)
class MuxConfig:
    """Limits and timers of one yamux session.

    The sans-I/O session uses the limits; the timers (``ping_interval``,
    ``ping_timeout``, ``open_timeout``) are read by the I/O layer, which owns
    the clock. ``node_recv_budget`` is the limit of the one ``WindowBudget``
    counter the I/O layer shares between all sessions of the process.
    """

    #: Receive windows start at 256 KiB and grow toward this when the
    #: application consumes fast enough that the window, not the link, limits
    #: throughput (bandwidth-delay product).
    max_window: int = 16 * 1024 * 1024
    #: Receive budget of one session (one agent link): the window granted
    #: above each stream's initial 256 KiB, all its streams together. A
    #: window grows only while the session stays within it, so one fast
    #: stream can have all of it (up to ``max_window``) and many streams
    #: split it. It bounds what the peer may have in flight toward us, and so
    #: what either end buffers for the link, at streams x 256 KiB + this.
    #: 0: windows never grow (plain yamux, 256 KiB per stream).
    recv_budget: int = 16 * 1024 * 1024
    #: The same, all sessions of the node (process) together: a relay with
    #: many busy agents grows windows only while the sum stays within this.
    node_recv_budget: int = 256 * 1024 * 1024
    #: Seconds: a stream that took longer than this to consume half its
    #: window, and 16 times longer than its round trips would need, went
    #: idle or slow; its window halves (down to 256 KiB), and the budget it
    #: frees goes to other streams as the peer uses the credit it holds.
    window_idle: float = 1.0
    #: A data frame longer than this is a protocol error (FrameTooLarge).
    max_frame_payload: int = 16 * 1024 * 1024
    #: Outbound data is cut into frames of at most this many bytes.
    max_send_frame: int = 256 * 1024
    #: Streams open at once on one session (both directions together).
    max_streams: int = 8192
    #: Streams the peer opened that the application has not accepted yet.
    accept_backlog: int = 256
    #: Pongs queued and not yet taken by data_to_send(); beyond: ping flood.
    max_pending_pongs: int = 256
    #: Streams refused (RST) and not yet flushed; beyond: SYN flood.
    max_refused_streams: int = 1024
    #: Locally reset stream ids remembered so that the peer's in-flight data
    #: for them is dropped quietly instead of treated as a protocol error.
    reset_memory: int = 1024
    #: Seconds between keepalive pings on an idle link (I/O layer).
    ping_interval: float = 10.0
    #: Seconds a ping may go unanswered before the link counts as dead.
    ping_timeout: float = 15.0
    #: Seconds an opened stream may wait for the peer's ACK (I/O layer).
    open_timeout: float = 10.0

    def __post_init__(self) -> None:
        need = _checker(self, "mux")
        need(INITIAL_WINDOW <= self.max_window <= MAX_WINDOW_LIMIT, "max_window",
             f"must be between {INITIAL_WINDOW} and {MAX_WINDOW_LIMIT}")
        need(0 <= self.recv_budget <= MAX_BUDGET, "recv_budget", f"must be between 0 and {MAX_BUDGET}")
        need(self.recv_budget <= self.node_recv_budget <= MAX_BUDGET, "node_recv_budget",
             f"must be between recv_budget and {MAX_BUDGET}")
        need(INITIAL_WINDOW <= self.max_frame_payload <= MAX_WINDOW_LIMIT, "max_frame_payload",
             f"must be between {INITIAL_WINDOW} and {MAX_WINDOW_LIMIT}")
        need(1024 <= self.max_send_frame <= INITIAL_WINDOW, "max_send_frame",
             f"must be between 1024 and {INITIAL_WINDOW}")
        need(1 <= self.max_streams <= 1 << 20, "max_streams", "must be between 1 and 1048576")
        need(1 <= self.accept_backlog <= self.max_streams, "accept_backlog",
             "must be between 1 and max_streams")
        need(1 <= self.max_pending_pongs <= 1 << 20, "max_pending_pongs", "must be positive")
        need(1 <= self.max_refused_streams <= 1 << 20, "max_refused_streams", "must be positive")
        need(0 <= self.reset_memory <= 1 << 20, "reset_memory", "must not be negative")
        for name in ("ping_interval", "ping_timeout", "open_timeout", "window_idle"):
            need(0 < getattr(self, name) <= 3600, name, "must be between 0 and 3600 seconds")


@dataclass(frozen=True)
class AdmissionConfig:
    """Limits on connections that have proven nothing yet: from accept until
    the TLS handshake and the first request (an agent's preamble, an HTTPS
    request head) are done. Read by the relay's listeners (I/O layer).

    An attacker can open connections faster than any timeout closes them;
    these caps bound what that costs (file descriptors, TLS state, memory) and
    keep room for agents and established streams."""

    #: Unauthenticated connections at once on the node, all listeners together.
    max_unauthenticated: int = 1024
    #: ... from one source (an IPv4 address, or an IPv6 /64).
    max_unauthenticated_per_source: int = 64
    #: Seconds a TLS handshake may take.
    handshake_timeout: float = 10.0
    #: Seconds an agent has, after its handshake, to send its whole preamble
    #: request (enrol, renew, open the link).
    preamble_timeout: float = 10.0
    #: File descriptors kept free: above (limit - headroom), new
    #: unauthenticated and public connections are refused.
    fd_headroom: int = 256

    def __post_init__(self) -> None:
        need = _checker(self, "admission")
        need(1 <= self.max_unauthenticated <= 1 << 20, "max_unauthenticated", "must be between 1 and 1048576")
        need(1 <= self.max_unauthenticated_per_source <= self.max_unauthenticated,
             "max_unauthenticated_per_source", "must be between 1 and max_unauthenticated")
        need(0 < self.handshake_timeout <= 300, "handshake_timeout", "must be between 0 and 300 seconds")
        need(0 < self.preamble_timeout <= 300, "preamble_timeout", "must be between 0 and 300 seconds")
        need(16 <= self.fd_headroom <= 1 << 20, "fd_headroom", "must be at least 16")


@dataclass(frozen=True)
class SpliceConfig:
    """Limits of a TCP splice: a public client on the relay, a service's
    connection on the agent (relayd.net.splice.TcpSplice, I/O layer)."""

    #: Bytes held from the TCP side while reading is paused (only what was in
    #: flight when the pause took effect can arrive); beyond, the connection
    #: is aborted: the peer ignores flow control.
    max_pending: int = 4 * 1024 * 1024
    #: Bytes held from a client that waits for its stream (held for an agent
    #: by ``grace``) before reading pauses.
    max_held: int = 256 * 1024

    def __post_init__(self) -> None:
        need = _checker(self, "splice")
        need(64 * 1024 <= self.max_pending <= 1 << 30, "max_pending", "must be between 65536 and 1073741824")
        need(1024 <= self.max_held <= self.max_pending, "max_held", "must be between 1024 and max_pending")


SPLICE = SpliceConfig()
