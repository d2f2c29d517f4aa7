"""Public face of the WebSocket core: the active build (compiled or pure) of
the frame codec and the connection; constants from the pure module, events
from relayd.core.ws_events and errors from relayd.errors (one class each for
both builds); the opening handshake from relayd.core.wshandshake."""

from relayd import errors as _errors
from relayd._build import load
from relayd.core import _wsframe_py as _pure
from relayd.core.ws_events import (EVENT_TYPES, BinaryMessage, Close, DataFrame, Ping, Pong, TextMessage,
                                   WsProtocolError)
from relayd.core.wsconfig import AGENT_LINK, WsConfig

_impl = load("wsframe")

FrameParser = _impl.FrameParser
Connection = _impl.Connection
mask = _impl.mask
encode_frame = _impl.encode_frame
encode_header = _impl.encode_header
encode_close = _impl.encode_close
close_code_allowed = _impl.close_code_allowed

OP_CONTINUATION = _pure.OP_CONTINUATION
OP_TEXT = _pure.OP_TEXT
OP_BINARY = _pure.OP_BINARY
OP_CLOSE = _pure.OP_CLOSE
OP_PING = _pure.OP_PING
OP_PONG = _pure.OP_PONG
CLOSE_NORMAL = _pure.CLOSE_NORMAL
CLOSE_GOING_AWAY = _pure.CLOSE_GOING_AWAY
CLOSE_PROTOCOL_ERROR = _pure.CLOSE_PROTOCOL_ERROR
CLOSE_UNSUPPORTED = _pure.CLOSE_UNSUPPORTED
CLOSE_NO_STATUS = _pure.CLOSE_NO_STATUS
CLOSE_ABNORMAL = _pure.CLOSE_ABNORMAL
CLOSE_INVALID_DATA = _pure.CLOSE_INVALID_DATA
CLOSE_POLICY = _pure.CLOSE_POLICY
CLOSE_TOO_BIG = _pure.CLOSE_TOO_BIG
CLOSE_INTERNAL = _pure.CLOSE_INTERNAL
OPEN = _pure.OPEN
CLOSING = _pure.CLOSING
CLOSED = _pure.CLOSED
WebSocketError = _errors.WebSocketError
InvalidUtf8 = _errors.InvalidUtf8
MessageTooBig = _errors.MessageTooBig
COMPILED = _impl is not _pure

__all__ = ["FrameParser", "Connection", "WsConfig", "AGENT_LINK", "EVENT_TYPES", "DataFrame", "TextMessage", "BinaryMessage",
           "Ping", "Pong", "Close", "WsProtocolError", "mask", "encode_frame", "encode_header", "encode_close",
           "close_code_allowed", "COMPILED"]
