"""Public TCP endpoints: the TCP way in.

Each endpoint (``--tcp NAME=HOST:PORT``) is a listener; every connection to
it becomes one stream to an agent serving that endpoint, opened through the
stream seam (relayd.gateway.streams), then spliced with back-pressure both
ways (relayd.net.splice). A connection refused by admission (descriptor
headroom) is closed before it is routed.
"""

from __future__ import annotations

import asyncio

from relayd import metrics
from relayd.core.config import SPLICE, SpliceConfig
from relayd.gateway.streams import StreamSeam
from relayd.net import admission, peer_name
from relayd.net.splice import TcpSplice


class TcpEndpoints:
    def __init__(self, seam: StreamSeam, adm: admission.Admission, limits: SpliceConfig = SPLICE) -> None:
        self.seam = seam
        self.admission = adm
        self.limits = limits
        self.ports: dict[str, int] = {}  # endpoint -> bound port (the first, if several)
        self._servers: dict[str, list[asyncio.AbstractServer]] = {}
        self._stopped: list[asyncio.AbstractServer] = []
        self._open: set[PublicConnection] = set()
        self._gauges: dict[str, object] = {}

    async def listen(self, endpoint: str, socks: list) -> None:
        loop = asyncio.get_running_loop()
        servers = self._servers.setdefault(endpoint, [])
        for sock in socks:
            servers.append(await loop.create_server(lambda: PublicConnection(self, endpoint), sock=sock,
                                                    backlog=1024))
        self.ports[endpoint] = socks[0].getsockname()[1]

    def stop(self, endpoint: str) -> None:
        """One endpoint stops accepting (reload removed or moved it); its
        open connections go on until they end."""
        for s in self._servers.pop(endpoint, []):
            s.close()
            self._stopped.append(s)
        self.ports.pop(endpoint, None)

    def close(self) -> None:
        """Stop accepting; open connections go on."""
        for name in list(self._servers):
            self.stop(name)

    def abort_all(self) -> None:
        """Cut every open connection (with a reset)."""
        for sp in list(self._open):
            sp._abort()

    async def wait_closed(self) -> None:
        for s in self._stopped:
            try:
                await asyncio.wait_for(s.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass

    def _route(self, sp: "PublicConnection") -> None:
        self._open.add(sp)
        self._gauge(sp.endpoint).inc()
        sp.opening = self.seam.open(sp.endpoint, peer_name(sp.transport), sp.stream_ready)

    def _closed(self, sp: "PublicConnection") -> None:
        self._open.discard(sp)
        self._gauge(sp.endpoint).dec()
        if sp.opening is not None:  # gone while held for an agent
            sp.opening.cancel()
            sp.opening = None

    def _gauge(self, endpoint: str):
        g = self._gauges.get(endpoint)
        if g is None:
            g = self._gauges[endpoint] = metrics.ACTIVE_CONNECTIONS.labels(endpoint)
        return g


class PublicConnection(TcpSplice):
    """A client of a public endpoint; routed to an agent once connected."""

    def __init__(self, endpoints: TcpEndpoints, endpoint: str) -> None:
        super().__init__(on_close=endpoints._closed, limits=endpoints.limits)
        self.endpoints = endpoints
        self.endpoint = endpoint
        self.opening = None  # the stream seam's Opening while held for an agent

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if admission.public_connection_ok(self.endpoints.admission, transport, "tcp"):
            self.endpoints._route(self)
        else:
            self.on_close = None  # never routed: nothing to account for

    def stream_ready(self, stream, reason) -> None:
        """The stream seam's answer: splice, or reset the client."""
        self.opening = None
        if stream is None:
            self._abort()
        elif self._done:
            stream.reset()  # the client left meanwhile
        else:
            self.bind(stream)
