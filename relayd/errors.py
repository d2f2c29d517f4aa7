"""The error hierarchy of relayd.

Errors are values: the sans-I/O core reports a peer's protocol violation as an
event carrying one of these (and answers with a GoAway), it does not raise it
into the caller's I/O loop. Commands a local caller issues wrongly (writing to
a closed stream, opening a stream after GoAway) raise, because that is a bug
in the caller, not bad input from the network.

Messages name what was wrong and where (frame type, stream id, sizes), never
payload bytes or secrets, so they are safe to log.
"""

from __future__ import annotations


class RelaydError(Exception):
    """Base of every error relayd raises or reports."""


class ConfigError(RelaydError, ValueError):
    """A limit or option has an invalid value."""


class ProtocolError(RelaydError):
    """The peer broke the wire protocol; the session answers with GoAway."""

    #: yamux GoAway code sent when this error ends a session.
    goaway_code = 1

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.args == other.args  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash((type(self), self.args))


class BadVersion(ProtocolError):
    """A frame header carried a version other than 0."""


class UnknownFrameType(ProtocolError):
    """A frame header carried a type outside Data/WindowUpdate/Ping/GoAway."""


class InvalidFlags(ProtocolError):
    """A flag combination that no valid frame can carry."""


class FrameTooLarge(ProtocolError):
    """A data frame longer than the configured maximum payload."""


class FlowControlError(ProtocolError):
    """Data beyond the advertised window, or a window update that overflows."""


class StreamIdError(ProtocolError):
    """A stream id of the wrong parity, zero where it may not be, or reused."""


class UnknownStreamError(ProtocolError):
    """A frame for a stream that was never opened."""


class StreamClosedError(ProtocolError):
    """Data or FIN on a stream the peer had already closed."""


class FloodError(ProtocolError):
    """The peer makes us queue more replies (pongs, refusals) than allowed."""


class WebSocketError(ProtocolError):
    """A WebSocket peer broke RFC 6455; ``close_code`` is the code to close with."""

    close_code = 1002  # protocol error


class InvalidUtf8(WebSocketError):
    """Text (or a close reason) that is not UTF-8."""

    close_code = 1007  # invalid frame payload data


class MessageTooBig(FrameTooLarge):
    """A WebSocket message above the configured limit."""

    close_code = 1009  # message too big


class WebSocketFlood(FloodError):
    """The peer makes a WebSocket connection queue more pongs than
    ``max_buffered`` allows while the I/O layer is not writing."""

    close_code = 1008  # policy violation


class InvalidHandshake(WebSocketError):
    """A WebSocket opening handshake that RFC 6455 section 4 refuses (the
    server's reply as the client checks it)."""


class WebSocketStateError(RelaydError):
    """A local command a WebSocket connection cannot take in its state:
    sending after the close, a new message inside a fragmented one. A bug in
    the caller, so it raises."""


class InternalError(RelaydError):
    """A bug in relayd itself; the session ends with GoAway internal-error."""

    goaway_code = 2


class StreamError(RelaydError):
    """A local command on a stream that cannot take it."""


class StreamResetError(StreamError):
    """The stream was reset (by the peer or locally)."""


class SessionClosedError(RelaydError):
    """The session has ended (GoAway, protocol error or transport closed)."""


class AuthError(RelaydError):
    """An identity, token or certificate was refused.

    ``code`` is the refusal's kind as the link protocol carries it
    (relayd.core.wire): peers act on the code, never on the text.
    """

    code = "unauthorized"


class RevokedError(AuthError):
    """A certificate or identity that was revoked (or is unknown)."""

    code = "revoked"


class ForbiddenError(AuthError):
    """A known identity asking for something it may not have."""

    code = "forbidden"


class DataDirError(ConfigError):
    """A data directory that cannot be used (not a directory, read-only) or
    whose parts do not belong together (the database and the CA)."""


class StorageError(RelaydError):
    """Reading or writing the node's database failed (disk full, I/O error,
    read-only file system); the operation was rolled back."""


class TemporaryError(RelaydError):
    """A failure that may pass (the peer is unreachable or failed): trying
    again later can succeed, unlike a refusal."""
