"""The compiled build really is compiled, with the .pxd applied.

If Cython could not find ``_ext/relayd/core/_yamux_c.pxd`` (wrong path, no
``__init__.pxd``), it would still compile the module, but as ordinary Python
classes with instance dicts and boxed attributes: fast-looking, slow in fact.
"""

import pytest

from relayd import _build
from tests.conftest import BUILDS

pytestmark = pytest.mark.skipif("compiled" not in BUILDS, reason="RELAYD_NO_EXTENSIONS=1: no compiled build to check")

Py_TPFLAGS_HEAPTYPE = 1 << 9


def test_compiled_module_is_an_extension():
    from relayd.core import _yamux_c

    assert _build.is_compiled(_yamux_c)
    assert _yamux_c.__file__.endswith(".so")


@pytest.mark.parametrize("name", ["Session", "_Stream", "WindowBudget", "DataReceived", "StreamOpened", "FrameHeader", "ProtocolErrorEvent"])
def test_classes_are_extension_types(name):
    from relayd.core import _yamux_c

    cls = getattr(_yamux_c, name)
    # Cython extension types are static types without a per-instance dict.
    assert not cls.__flags__ & Py_TPFLAGS_HEAPTYPE, f"{name} is a heap (Python) class"
    assert cls.__dictoffset__ == 0, f"{name} instances have a __dict__"


def test_session_attributes_are_c_fields():
    from relayd.core import _yamux_c

    s = _yamux_c.Session(True)
    assert not hasattr(s, "__dict__")
    assert not hasattr(s, "_streams")  # a private cdef field, invisible to Python
    with pytest.raises(AttributeError):
        s.anything = 1
    ev = _yamux_c.DataReceived(1, b"x")
    with pytest.raises(AttributeError):
        ev.stream_id = 2


def test_facade_selects_compiled_by_default():
    from relayd.core import yamux

    assert yamux.COMPILED
    assert _build.report() == {"relayd.core._yamux": "compiled", "relayd.core._wsframe": "compiled",
                               "relayd.core._h1proxy": "compiled", "relayd.core._flowfilter": "compiled"}


@pytest.mark.parametrize("name", ["FrameParser", "Connection"])
def test_websocket_classes_are_extension_types(name):
    from relayd.core import _wsframe_c

    assert _wsframe_c.__file__.endswith(".so")
    cls = getattr(_wsframe_c, name)
    assert not cls.__flags__ & Py_TPFLAGS_HEAPTYPE and cls.__dictoffset__ == 0
    assert not hasattr(_wsframe_c.FrameParser(True), "_left")  # a C field
    assert not hasattr(_wsframe_c.Connection(True), "_out")


def test_websocket_events_are_shared_not_compiled():
    """Events are plain classes of relayd.core.ws_events, the same objects
    in both builds (not extension types of either)."""
    from relayd.core import _wsframe_c, _wsframe_py, ws_events

    for name in ("DataFrame", "Ping", "Pong", "Close", "WsProtocolError", "TextMessage", "BinaryMessage"):
        assert getattr(_wsframe_c, name) is getattr(_wsframe_py, name) is getattr(ws_events, name)


@pytest.mark.parametrize("name", ["Framing", "Request", "ChunkedEnd"])
def test_http_framing_classes_are_extension_types(name):
    from relayd.core import _h1proxy_c, h1proxy

    assert h1proxy.COMPILED and h1proxy.Framing is _h1proxy_c.Framing
    cls = getattr(_h1proxy_c, name)
    assert not cls.__flags__ & Py_TPFLAGS_HEAPTYPE and cls.__dictoffset__ == 0
    with pytest.raises(AttributeError):
        _h1proxy_c.Request().not_a_field = 1
    with pytest.raises(AttributeError):  # fields are private unless the contract says readonly
        _h1proxy_c.Framing(b"x").inbuf


_NEGATIVE_SUBSCRIPTS = r"""
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
bad = []
for node in ast.walk(tree):
    if isinstance(node, ast.Subscript):
        idx = node.slice
        parts = [idx.lower, idx.upper] if isinstance(idx, ast.Slice) else [idx]
        bad += [node.lineno for p in parts if isinstance(p, ast.UnaryOp) and isinstance(p.op, ast.USub)]
print(bad)
"""


@pytest.mark.parametrize("base", sorted(_build.HOT_MODULES.values()))
def test_hot_sources_never_index_from_the_end(base):
    """The compiled builds turn off wraparound: ``x[-1]`` there reads before
    the start of the buffer instead of from its end (a crash, or worse, in
    the compiled build only). Negative subscripts are banned from the one
    source; write ``x[len(x) - 1]``. (Parsed in a fresh interpreter: CPython
    3.11's ast.parse can fail spuriously in a process other tests have used
    deeply.)"""
    import importlib.util
    import subprocess
    import sys

    path = importlib.util.find_spec(base + "_py").origin
    out = subprocess.run([sys.executable, "-c", _NEGATIVE_SUBSCRIPTS, path], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", f"{path}: negative subscripts on lines {out}"
