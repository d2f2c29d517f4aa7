"""``relayd demo``: the README's first command.

A real relay, one agent enrolled with a one-time join token, and two sample
services (an echo service and a tiny web page), all on loopback in this one
process; traffic through the tunnel, a short account of it, and the ports to
try by hand. Ctrl-C stops everything and removes the demo's data.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import tempfile
import time
from pathlib import Path

from relayd import _build
from relayd.agent import AgentNode
from relayd.config import AgentConfig, ServeConfig
from relayd.control.jointoken import JoinToken
from relayd.gateway.node import RelayNode


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode(errors="replace")
            body = f"hello from the service behind the relayd agent\npath: {path}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, IndexError):
        pass
    finally:
        writer.close()


async def _echo_through(port: int, nbytes: int, block: bytes) -> bool:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    sent, got = hashlib.sha256(), hashlib.sha256()

    async def send() -> None:
        left = nbytes
        while left:
            piece = block[: min(left, len(block))]
            sent.update(piece)
            w.write(piece)
            await w.drain()
            left -= len(piece)
        w.write_eof()

    async def recv() -> None:
        while data := await r.read(256 * 1024):
            got.update(data)

    await asyncio.gather(send(), recv())
    w.close()
    return sent.digest() == got.digest()


async def run_demo(once: bool = False, mib: int = 256) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    echo_srv = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
    web_srv = await asyncio.start_server(_web, "127.0.0.1", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    web_port = web_srv.sockets[0].getsockname()[1]
    ok = False
    with tempfile.TemporaryDirectory(prefix="relayd-demo-") as tmp:
        relay = RelayNode(ServeConfig(data=Path(tmp) / "relay", agents=("127.0.0.1", 0),
                                      tcp={"echo": ("127.0.0.1", 0), "web": ("127.0.0.1", 0)}))
        await relay.start()
        agent = None
        try:
            token_id, secret = relay.store.create_join_token(["echo", "web"], 900)
            token = JoinToken(f"127.0.0.1:{relay.agents_port}", relay.ca.pin, token_id, secret).encode()
            agent = AgentNode(AgentConfig(data=Path(tmp) / "agent", join=token, endpoints={
                "echo": ("127.0.0.1", echo_port), "web": ("127.0.0.1", web_port)}))
            t0 = time.perf_counter()
            await agent.start()
            await asyncio.wait_for(agent.connected.wait(), 15)
            t_join = time.perf_counter() - t0
            pe, pw = relay.tcp_ports["echo"], relay.tcp_ports["web"]
            print(f"relay   agents port 127.0.0.1:{relay.agents_port} (TLS); public endpoints "
                  f"echo=127.0.0.1:{pe} web=127.0.0.1:{pw}")
            print(f"agent   {agent.identity['agent_id']}: join token redeemed (CA pin checked, key made locally, "
                  f"certificate signed by the relay's CA), connected over mTLS in {t_join * 1000:.0f} ms")
            print(f"        serves echo -> 127.0.0.1:{echo_port}, web -> 127.0.0.1:{web_port} "
                  f"(outbound link only: no port opened on the agent side)")

            per = mib * 1024 * 1024 // 4
            block = os.urandom(256 * 1024)
            t0 = time.perf_counter()
            ok = all(await asyncio.gather(*(_echo_through(pe, per, block) for _ in range(4))))
            dt = time.perf_counter() - t0
            lat = []
            for _ in range(200):
                t1 = time.perf_counter()
                r, w = await asyncio.open_connection("127.0.0.1", pw)
                w.write(b"GET /hello HTTP/1.1\r\nHost: demo\r\n\r\n")
                await r.readuntil(b"\r\n\r\n")
                w.close()
                lat.append(time.perf_counter() - t1)
            lat.sort()
            print(f"traffic {mib} MiB echoed through 4 tunnelled connections in {dt:.2f} s "
                  f"({mib * 2 * 8 / 1024 / dt:.2f} Gbit/s both ways), SHA-256 {'verified' if ok else 'MISMATCH'}")
            print(f"        200 new HTTP connections through the tunnel: median {lat[100] * 1000:.2f} ms, "
                  f"p99 {lat[197] * 1000:.2f} ms (connect + request + response)")
            print(f"builds  {', '.join(f'{k}: {v}' for k, v in _build.report().items())}")
            if not once:
                print(f"\ntry it  curl http://127.0.0.1:{pw}/    or    nc 127.0.0.1 {pe}\n"
                      f"        Ctrl-C stops relay, agent and services")
                await stop.wait()
        finally:
            if agent is not None:
                await agent.stop()
            await relay.stop()
            echo_srv.close()
            web_srv.close()
    print("stopped relay, agent and sample services; demo data removed")
    return 0 if ok else 1
