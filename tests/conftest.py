import importlib

import pytest

from relayd._build import extensions_disabled

#: Builds of the hot modules every core test runs against. With
#: RELAYD_NO_EXTENSIONS=1 (CI's second axis) only the pure twin exists.
BUILDS = ["pure"] if extensions_disabled() else ["compiled", "pure"]


def yamux_build(name: str):
    return importlib.import_module(
        "relayd.core._yamux_c" if name == "compiled" else "relayd.core._yamux_py"
    )


@pytest.fixture(params=BUILDS)
def ymx(request):
    """The yamux core module of one build (compiled or pure)."""
    return yamux_build(request.param)
