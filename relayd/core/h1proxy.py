"""Public face of the ingress's HTTP/1.1 framing: the active build (compiled
or pure) of relayd/core/_h1proxy_py.py, which holds the code and its
documentation; constants (events, states, transition tables) from the pure
module, the same values in both builds."""

from relayd._build import is_compiled, load
from relayd.core import _h1proxy_py as _pure

_impl = load("h1proxy")

Framing = _impl.Framing
Request = _impl.Request
ChunkedEnd = _impl.ChunkedEnd
FramingBug = _impl.FramingBug
clear_head_cache = _impl.clear_head_cache

EV_START = _pure.EV_START
EV_UPSTREAM = _pure.EV_UPSTREAM
EV_COMPLETE = _pure.EV_COMPLETE
EV_CLIENT = _pure.EV_CLIENT
EV_DONE = _pure.EV_DONE
EV_DROP = _pure.EV_DROP
EV_CLOSE = _pure.EV_CLOSE
EV_ABORT = _pure.EV_ABORT
EV_FAIL = _pure.EV_FAIL
EV_NOTE = _pure.EV_NOTE
EV_RETRY = _pure.EV_RETRY
EVENT_NAMES = _pure.EVENT_NAMES
CLIENT_STATES = _pure.CLIENT_STATES
SERVICE_STATES = _pure.SERVICE_STATES
CLIENT_TABLE = _pure.CLIENT_TABLE
SERVICE_TABLE = _pure.SERVICE_TABLE
HOP_BY_HOP = _pure.HOP_BY_HOP
CONTINUE = _pure.CONTINUE
COMPILED = is_compiled(_impl)
