"""Public face of the HTTP ingress: the active build (compiled or pure) of
``relayd/net/_http_py.py``, which holds the code and its documentation."""

from relayd._build import is_compiled, load

_impl = load("http")

HttpConnection = _impl.HttpConnection
Request = _impl.Request
Route = _impl.Route
RouteTable = _impl.RouteTable
parse_route = _impl.parse_route
pick_route = _impl.pick_route
COMPILED = is_compiled(_impl)
