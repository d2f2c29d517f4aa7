"""Events of the WebSocket core (relayd.core.wsframe), defined once.

Both builds of the core (the compiled ``_wsframe_c`` and the pure
``_wsframe_py``) return instances of these very classes, so that code written
against one build (``type(ev) is Ping``, ``isinstance``, pattern matching)
works with the other. Frozen dataclasses: values, compared by content.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DataFrame:
    """Part of a text (``opcode`` 1) or binary (2) message, as it arrives;
    ``fin`` on its last part. Text parts are UTF-8 checked so far (a
    character may be split between two parts)."""

    opcode: int
    data: bytes
    fin: bool


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A whole text message (a connection that assembles messages)."""

    data: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    """A whole binary message (a connection that assembles messages)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer's ping; a connection has already queued the pong."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame; ``code`` is 1005 when it carried none. A
    connection has already queued its answer (the closing handshake)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class WsProtocolError:
    """The peer broke RFC 6455 (or a limit): parsing stopped; the close frame
    with ``close_code`` is queued (a connection) or is the caller's to send
    (a bare FrameParser). ``error`` is a relayd.errors value."""

    error: object
    close_code: int


#: Every event type a connection or a parser returns.
EVENT_TYPES = (DataFrame, TextMessage, BinaryMessage, Ping, Pong, Close, WsProtocolError)
