"""Public face of the WebSocket frame codec: the active build (compiled or
pure); constants from the pure module (one source of both builds)."""

from relayd._build import load
from relayd.core import _wsframe_py as _pure

_impl = load("wsframe")

FrameParser = _impl.FrameParser
DataFrame = _impl.DataFrame
Ping = _impl.Ping
Pong = _impl.Pong
Close = _impl.Close
WsProtocolError = _impl.WsProtocolError
mask = _impl.mask
encode_frame = _impl.encode_frame
encode_header = _impl.encode_header
encode_close = _impl.encode_close

OP_CONTINUATION = _pure.OP_CONTINUATION
OP_TEXT = _pure.OP_TEXT
OP_BINARY = _pure.OP_BINARY
OP_CLOSE = _pure.OP_CLOSE
OP_PING = _pure.OP_PING
OP_PONG = _pure.OP_PONG
CLOSE_NORMAL = _pure.CLOSE_NORMAL
CLOSE_PROTOCOL_ERROR = _pure.CLOSE_PROTOCOL_ERROR
CLOSE_INVALID_DATA = _pure.CLOSE_INVALID_DATA
CLOSE_TOO_BIG = _pure.CLOSE_TOO_BIG
WebSocketError = _pure.WebSocketError  # relayd.errors' (one class for both builds)
InvalidUtf8 = _pure.InvalidUtf8
MessageTooBig = _pure.MessageTooBig
COMPILED = _impl is not _pure
