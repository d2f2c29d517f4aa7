"""Public face of the yamux core: the active build (compiled or pure).

Constants come from the pure module, the one source of both builds (the
compiled build keeps them as C globals, invisible to Python).
"""

from relayd._build import load
from relayd.core import _yamux_py as _pure
from relayd.core.config import INITIAL_WINDOW, MuxConfig

_impl = load("yamux")

Session = _impl.Session
WindowBudget = _impl.WindowBudget
FrameHeader = _impl.FrameHeader
encode_header = _impl.encode_header
decode_header = _impl.decode_header
StreamOpened = _impl.StreamOpened
StreamAccepted = _impl.StreamAccepted
DataReceived = _impl.DataReceived
StreamEnded = _impl.StreamEnded
StreamReset = _impl.StreamReset
WindowUpdated = _impl.WindowUpdated
PingReceived = _impl.PingReceived
PongReceived = _impl.PongReceived
GoAwayReceived = _impl.GoAwayReceived
ProtocolErrorEvent = _impl.ProtocolErrorEvent
EVENT_TYPES = _impl.EVENT_TYPES

PROTO_VERSION = _pure.PROTO_VERSION
HEADER_SIZE = _pure.HEADER_SIZE
TYPE_DATA = _pure.TYPE_DATA
TYPE_WINDOW_UPDATE = _pure.TYPE_WINDOW_UPDATE
TYPE_PING = _pure.TYPE_PING
TYPE_GO_AWAY = _pure.TYPE_GO_AWAY
FLAG_SYN = _pure.FLAG_SYN
FLAG_ACK = _pure.FLAG_ACK
FLAG_FIN = _pure.FLAG_FIN
FLAG_RST = _pure.FLAG_RST
GO_AWAY_NORMAL = _pure.GO_AWAY_NORMAL
GO_AWAY_PROTOCOL_ERROR = _pure.GO_AWAY_PROTOCOL_ERROR
GO_AWAY_INTERNAL_ERROR = _pure.GO_AWAY_INTERNAL_ERROR

COMPILED = _impl is not _pure

__all__ = [n for n in dir() if not n.startswith("_")] + ["INITIAL_WINDOW", "MuxConfig"]
