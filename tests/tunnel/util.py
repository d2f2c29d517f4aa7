"""In-process relay, agents and services on loopback for the tunnel tests."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

from relayd.agent import AgentNode
from relayd.config import AgentConfig, ServeConfig
from relayd.demo import echo_handler
from relayd.control.jointoken import JoinToken
from relayd.core.config import MuxConfig
from relayd.gateway.node import RelayNode

FAST_MUX = MuxConfig(ping_interval=0.5, ping_timeout=1.5, open_timeout=5)


@contextlib.asynccontextmanager
async def echo_service():
    srv = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()


async def start_relay(tmp: Path, endpoints=("echo",), port: int = 0, **kw) -> RelayNode:
    cfg = ServeConfig(data=tmp / "relay", agents=("127.0.0.1", port),
                      tcp={e: ("127.0.0.1", 0) for e in endpoints}, mux=kw.pop("mux", FAST_MUX), **kw)
    relay = RelayNode(cfg)
    await relay.start()
    return relay


def join_token(relay: RelayNode, endpoints=(), ttl: float = 900.0) -> str:
    token_id, secret = relay.store.create_join_token(list(endpoints), ttl)
    return JoinToken(f"127.0.0.1:{relay.agents_port}", relay.ca.pin, token_id, secret).encode()


async def start_agent(tmp: Path, name: str, token: str | None, endpoints: dict, wait: bool = True,
                      **kw) -> AgentNode:
    cfg = AgentConfig(data=tmp / name, join=token, endpoints=endpoints, mux=kw.pop("mux", FAST_MUX),
                      reconnect_max=kw.pop("reconnect_max", 1.0), **kw)
    agent = AgentNode(cfg)
    await agent.start()
    if wait:
        await asyncio.wait_for(agent.connected.wait(), 10)
    return agent


async def roundtrip(port: int, payload: bytes = b"", timeout: float = 10) -> bytes:
    """Send payload through the tunnel to an echo service; return the echo."""
    payload = payload or os.urandom(100_000)

    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(payload)
        w.write_eof()
        got = b""
        while data := await r.read(65536):
            got += data
        w.close()
        return got

    return await asyncio.wait_for(go(), timeout)


async def echo_ok(port: int, size: int = 200_000) -> bool:
    payload = os.urandom(size)
    try:
        return hashlib.sha256(await roundtrip(port, payload)).digest() == hashlib.sha256(payload).digest()
    except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


async def exchange_ok(port: int, size: int = 200_000, timeout: float = 10) -> bool:
    """Request/response without half-close (what a client of a TLS service
    does): send, read the same number of bytes back, close."""
    payload = os.urandom(size)

    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(payload)
        got = await r.readexactly(size)
        w.close()
        return got == payload

    try:
        return await asyncio.wait_for(go(), timeout)
    except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False


async def refused(port: int, timeout: float = 5) -> bool:
    """True if a connection to ``port`` is closed on us promptly without data."""

    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"hello?")
        try:
            data = await r.read(100)
        except ConnectionError:
            data = b""
        w.close()
        return data == b""

    return await asyncio.wait_for(go(), timeout)

