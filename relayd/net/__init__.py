"""uvloop I/O: transports, TLS, and the glue from sockets to the sans-I/O core."""

from __future__ import annotations

import socket
import struct
from typing import Any, Coroutine

import uvloop


def run(main: Coroutine[Any, Any, Any], *, debug: bool | None = None) -> Any:
    """Run ``main`` to completion on a fresh uvloop event loop."""
    return uvloop.run(main, debug=debug)


_LINGER_ZERO = struct.pack("ii", 1, 0)


def abort_with_reset(transport) -> None:
    """Abort ``transport`` so that the peer sees a reset (RST), not an
    orderly FIN: a transfer cut short must never look complete. SO_LINGER
    with a zero timeout makes the kernel send RST when the socket closes."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass  # already closed, or not a TCP socket: a plain abort
    transport.abort()


def peer_name(transport) -> str:
    """``host:port`` (``[v6]:port``) of a transport's peer, for log lines."""
    try:
        p = transport.get_extra_info("peername")
    except Exception:
        return "?"
    if not p:
        return "?"
    host, port = p[0], p[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
