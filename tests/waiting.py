"""Waiting for a condition in a test: the one place where tests poll.

A test waits for the thing it means (a link up, a metric changed, a port
listening), never for a fixed time. Where the code offers an event or a
future, await that; where the condition can only be observed (a metric, a
process's output, a port), poll it here with a deadline. Failing the
deadline is an AssertionError that says what did not happen.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

#: How often a condition is checked; short, so that waits end promptly.
INTERVAL = 0.02


def _check(pred: Callable[[], T], ignore: tuple[type[BaseException], ...]) -> T | None:
    try:
        return pred() or None
    except ignore:
        return None


def _fail(what: str | Callable[[], str], timeout: float) -> AssertionError:
    return AssertionError(f"{what() if callable(what) else what} (waited {timeout:g}s)")


async def until(pred: Callable[[], T], timeout: float = 10, what: str | Callable[[], str] = "condition not reached",
                ignore: tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``pred`` on the running loop until it returns a true value, and
    return that value. Exceptions in ``ignore`` count as "not yet"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (v := _check(pred, ignore)) is None:
        if loop.time() > deadline:
            raise _fail(what, timeout)
        await asyncio.sleep(INTERVAL)
    return v


async def until_checked(check: Callable[[], Awaitable[T]], timeout: float = 10,
                        what: str | Callable[[], str] = "condition not reached", interval: float = 0.05) -> T:
    """``until`` for a condition that takes I/O to observe (a request, a
    Redis read): ``check`` is a coroutine function, awaited until it
    returns a true value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (v := await check()):
        if loop.time() > deadline:
            raise _fail(what, timeout)
        await asyncio.sleep(interval)
    return v


def until_sync(pred: Callable[[], T], timeout: float = 10, what: str | Callable[[], str] = "condition not reached",
               ignore: tuple[type[BaseException], ...] = (), interval: float = INTERVAL) -> T:
    """The same for code without a loop (threads, subprocesses); ``interval``
    may be raised when one check is costly (e.g. runs a CLI)."""
    deadline = time.monotonic() + timeout
    while (v := _check(pred, ignore)) is None:
        if time.monotonic() > deadline:
            raise _fail(what, timeout)
        time.sleep(interval)
    return v


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``port`` (a predicate for
    until_sync: a process has started and bound its port)."""
    try:
        socket.create_connection((host, port), 0.5).close()
        return True
    except OSError:
        return False
