"""Reaching the relay through an HTTP forward proxy (CONNECT), as agents in
networks that only let a proxy out must.

``--proxy http://user:pass@proxy:3128`` or the ``HTTPS_PROXY`` environment
variable (``NO_PROXY`` honoured). The agent opens a TCP connection to the
proxy, asks ``CONNECT relay:port`` (with Basic proxy authentication when the
URL carries credentials), and runs TLS to the relay through the tunnel the
proxy opens: the proxy sees only the relay's name and encrypted bytes.
Credentials are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from relayd.core import http1
from relayd.errors import AuthError, ConfigError



@dataclass(frozen=True)
class ProxyConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # no credentials in logs or tracebacks
        return f"ProxyConfig({self.host}:{self.port}, auth={'yes' if self.username else 'no'})"

    @property
    def display(self) -> str:
        return f"{self.host}:{self.port}"


def parse_proxy_url(url: str, key: str = "proxy") -> ProxyConfig:
    """``http://[user:pass@]host[:port]`` (port 8080 when absent)."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        raise ConfigError(f"config key '{key}': not a proxy URL") from None
    if u.scheme != "http":
        raise ConfigError(f"config key '{key}': only http:// proxies are supported (CONNECT), not {u.scheme!r}")
    if not u.hostname:
        raise ConfigError(f"config key '{key}': the proxy URL names no host")
    return ProxyConfig(u.hostname, port or 8080,
                       unquote(u.username) if u.username is not None else None,
                       unquote(u.password) if u.password is not None else None)


def proxy_from_env(target_host: str, environ=os.environ) -> ProxyConfig | None:
    """HTTPS_PROXY / https_proxy unless NO_PROXY / no_proxy covers the host."""
    url = environ.get("HTTPS_PROXY") or environ.get("https_proxy")
    if not url:
        return None
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    for entry in (e.strip() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*" or target_host == entry or target_host.endswith("." + entry.lstrip(".")):
            return None
        try:
            if ipaddress.ip_address(target_host) in ipaddress.ip_network(entry, strict=False):
                return None
        except ValueError:
            pass
    return parse_proxy_url(url, "HTTPS_PROXY")


async def connect_via_proxy(proxy: ProxyConfig, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A connected socket to ``host:port`` through the proxy's CONNECT."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            if proxy.username is not None:
                cred = base64.b64encode(f"{proxy.username}:{proxy.password or ''}".encode()).decode()
                head += f"Proxy-Authorization: Basic {cred}\r\n"
            await loop.sock_sendall(sock, (head + "\r\n").encode())
            reply = b""
            end = -1
            while end < 0:
                data = await loop.sock_recv(sock, 4096)
                if not data:
                    raise ConnectionError(f"proxy {proxy.display} closed the connection during CONNECT")
                reply += data
                end = http1.head_end(reply)
                if end < 0 and len(reply) > http1.LIMITS.max_head:
                    raise ConnectionError(f"proxy {proxy.display} sent an oversized reply")
        try:
            head = http1.parse_response_head(reply[:end])
        except http1.HeadError as exc:
            raise ConnectionError(f"proxy {proxy.display} sent a malformed reply to CONNECT: {exc}") from None
        code = head.status
        if code in (401, 407):  # 407 per RFC 9110; some proxies (tinyproxy) answer 401
            raise AuthError(f"proxy {proxy.display} refused the credentials ({code})")
        if code != 200:
            raise ConnectionError(f"proxy {proxy.display} refused CONNECT to {target}: "
                                  f"{code} {head.reason[:60].decode('latin-1')!r}")
        if end != len(reply):
            raise ConnectionError(f"proxy {proxy.display} sent data before the tunnel was ours")
        return sock
    except BaseException:
        sock.close()
        raise
