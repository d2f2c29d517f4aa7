"""`relayd hc forward`: a TCP service crosses a hybrid connection with no
change, as with Microsoft's azure-relay-bridge. Both sides run as real
`relayd hc forward` processes against a relay node on loopback; the bytes
are checked with SHA-256 both ways."""

import asyncio
import hashlib
import os

from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from tests.tunnel.processes import Proc, free_port
from tests.tunnel.util import echo_service, start_relay
from tests.waiting import listening, until

ROOT = sas.SasRule("RootManageSharedAccessKey", "cm9vdC1rZXktb2YtdGhlLW5vZGUtMTIzNA==",
                   rights=frozenset({"listen", "send", "manage"}))


def test_tcp_crosses_a_hybrid_connection_both_ways(tmp_path):
    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0),
                                  hybrid=Catalog.of([HybridConnection("db")], [ROOT]))
        cs = (f"Endpoint=sb://localhost:{relay.https_port}/;SharedAccessKeyName={ROOT.name};"
              f"SharedAccessKey={ROOT.primary_key};EntityPath=db")
        local = free_port()
        procs = []
        try:
            async with echo_service() as svc:
                procs.append(Proc(["hc", "forward", "--connection-string", cs, "-R", f"127.0.0.1:{svc}",
                                   "--ca", str(relay.ca_path)]))
                await until(lambda: relay.hybrid.listeners.get("db"), timeout=20)
                procs.append(Proc(["hc", "forward", "-L", str(local), "--ca", str(relay.ca_path)],
                                  env=dict(os.environ, RELAYD_HC_CONNECTION=cs)))
                await until(lambda: listening(local), timeout=20)
                for _ in range(2):  # two connections, one after the other
                    payload = os.urandom(4 << 20)
                    r, w = await asyncio.open_connection("127.0.0.1", local)
                    w.write(payload)  # (no half-close: a WebSocket has none; an end closes both sides)
                    got = await asyncio.wait_for(r.readexactly(len(payload)), 30)
                    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                    w.close()
        finally:
            for p in procs:
                p.stop()
            await relay.stop()

    run(main())


def test_forward_refuses_bad_arguments_clearly(tmp_path):
    from tests.tunnel.processes import cli

    res = cli("hc", "forward", "--connection-string", "Endpoint=sb://h/;SharedAccessKeyName=a;SharedAccessKey=b",
              check=False)
    assert res.returncode == 2 and "EntityPath" in res.stderr
    res = cli("hc", "forward", "--connection-string",
              "Endpoint=sb://h/;SharedAccessKeyName=a;SharedAccessKey=b;EntityPath=x", check=False)
    assert res.returncode == 2 and "-R HOST:PORT" in res.stderr
    res = cli("hc", "forward", "--connection-string", "nonsense", "-L", "1", check=False)
    assert res.returncode == 2 and "connection string" in res.stderr and "Traceback" not in res.stderr
