"""Every limit and timer of a WebSocket connection, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass

from relayd.errors import ConfigError

_MAX = (1 << 62) - 1


@dataclass(frozen=True)
class WsConfig:
    """Limits of one WebSocket connection (relayd.core.wsframe.Connection).

    The sans-I/O connection enforces the limits; ``close_timeout`` is read by
    the I/O layer, which owns the clock.
    """

    #: A message (all its fragments together) above this many bytes closes
    #: the connection with 1009. A connection that assembles messages holds
    #: up to this much per connection.
    max_message: int = 1024 * 1024
    #: One frame's payload above this many bytes closes with 1009, also when
    #: the message would fit (a peer that announces a huge frame is refused
    #: at its header).
    max_frame: int = 1024 * 1024
    #: Bytes queued for sending and not yet taken by data_to_send(): a ping
    #: whose pong would take the queue above this fails the connection with
    #: 1008 (the peer pings faster than the I/O layer can write). The
    #: application's own sends are never refused for size.
    max_buffered: int = 1024 * 1024
    #: Seconds the I/O layer waits for the peer to end the TCP connection
    #: after the closing handshake (a client waits for the server).
    close_timeout: float = 10.0

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"websocket.{name}: {why} (got {getattr(self, name)!r})")

        for name in ("max_message", "max_frame"):
            v = getattr(self, name)
            need(type(v) is int and 125 <= v <= _MAX, name, f"must be an integer between 125 and {_MAX}")
        need(type(self.max_buffered) is int and 256 <= self.max_buffered <= _MAX, "max_buffered",
             f"must be an integer between 256 and {_MAX}")
        need(0 < self.close_timeout <= 300, "close_timeout", "must be between 0 and 300 seconds")


#: The agent link's WebSocket (relay and agent side): a message carries yamux
#: frames, whose payload may reach the mux's 16 MiB frame limit. The
#: ``[websocket]`` table of the config sets it.
AGENT_LINK = WsConfig(max_message=16 * 1024 * 1024, max_frame=16 * 1024 * 1024)
