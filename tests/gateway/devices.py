"""A relay with its HTTPS port and device agents, on loopback, for the
device gateway and webhook tests."""

from __future__ import annotations

import asyncio
import ssl
import time

import orjson

from relayd.agent import AgentNode
from relayd.config import AgentConfig
from tests.tunnel.util import FAST_MUX, join_token, start_relay


async def relay_with_https(tmp_path, **kw):
    return await start_relay(tmp_path, endpoints=("echo",), https=("127.0.0.1", 0), **kw)


def add_device(relay, device_id: str, name: str = "cam", owner: str | None = None) -> None:
    """The dc_devices row enrollment over EST makes (until that lands, the
    tests write it themselves)."""
    with relay.store.transaction() as db:
        db.execute("INSERT INTO dc_devices(id, name, owner, created_at) VALUES (?, ?, ?, ?)",
                   (device_id, name, owner, time.time()))


async def start_device(tmp_path, relay, name: str, endpoints: dict, device: bool = True, **kw) -> AgentNode:
    """An agent enrolled with a join token, registered as a device
    (``device``) before its tunnel first comes up, then connected."""
    cfg = AgentConfig(data=tmp_path / name, join=join_token(relay), endpoints=endpoints, mux=FAST_MUX,
                      reconnect_max=1.0, **kw)
    agent = AgentNode(cfg)
    ident = await agent.enroll(cfg.join)
    if device:
        add_device(relay, ident["agent_id"])
    await agent.start()
    await asyncio.wait_for(agent.connected.wait(), 10)
    return agent


async def https(relay, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                cert: tuple | None = None, timeout: float = 10) -> tuple[int, dict, bytes]:
    """One request to the relay's HTTPS port: (status, headers, body)."""
    ctx = ssl.create_default_context(cafile=str(relay.ca_path))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    hdrs = {"Host": "127.0.0.1", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    return await http_request("127.0.0.1", relay.https_port, method, path, body, hdrs, ctx, timeout)


async def http_request(host, port, method, path, body, headers, ctx=None, timeout: float = 10, pieces=()):
    """``pieces``: more of the body, each written once the connection drains."""
    async def go():
        r, w = await asyncio.open_connection(host, port, ssl=ctx,
                                             server_hostname="127.0.0.1" if ctx else None)
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        w.write(head.encode() + body)
        for piece in pieces:
            w.write(piece)
            await w.drain()
        raw = await r.read()
        w.close()
        h, _, b = raw.partition(b"\r\n\r\n")
        lines = h.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        return int(lines[0].split()[1]), fields, b

    return await asyncio.wait_for(go(), timeout)


async def local(agent, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One request to the agent's local forwarder."""
    hdrs = {"Host": "127.0.0.1", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    return await http_request("127.0.0.1", agent.device_api.port, method, path, body, hdrs)


def note(**kw) -> bytes:
    return orjson.dumps({"type": "motion", "severity": "warning", "title": "door", "message": "moved", **kw})
