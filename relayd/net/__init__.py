"""uvloop I/O: transports, TLS, and the glue from sockets to the sans-I/O core."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import uvloop


def run(main: Coroutine[Any, Any, Any], *, debug: bool | None = None) -> Any:
    """Run ``main`` to completion on a fresh uvloop event loop."""
    return uvloop.run(main, debug=debug)


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop()
