import importlib

import pytest

from relayd._build import extensions_disabled
from relayd.log import reset_rate_limits

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


@pytest.fixture(autouse=True)
def _own_log_budget():
    """Rate-limited refusal lines (relayd.log.RateLimitedLog) start a new
    window in each test, so that a test that looks for one does not depend
    on what ran before it."""
    reset_rate_limits()
