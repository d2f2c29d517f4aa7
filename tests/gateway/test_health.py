"""GET /healthz on the metrics listener and `python -m relayd.healthcheck`
(the container image's HEALTHCHECK): healthy only while the node serves."""

import asyncio
import errno

import orjson

from relayd import healthcheck
from relayd.net import run
from tests.tunnel.processes import free_port
from tests.tunnel.util import echo_service, join_token, start_agent, start_relay
from tests.waiting import until


async def probe(url):
    return await asyncio.to_thread(healthcheck.check, url, 2.0)


def test_healthz_follows_what_the_node_serves(tmp_path, capsys):
    async def main():
        relay = await start_relay(tmp_path, metrics=("127.0.0.1", free_port()))
        url = f"http://127.0.0.1:{relay.metrics_port}/healthz"
        ok, said = await probe(url)
        assert ok and orjson.loads(said) == {"status": "ok", "agents": 0}
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)})
            ok, said = await probe(url)
            assert ok and orjson.loads(said)["agents"] == 1

            # Out of file descriptors: the agent listener pauses accepting, and says so.
            relay._listeners[0]._out_of_fds(OSError(errno.EMFILE, "Too many open files"))
            ok, said = await probe(url)
            assert not ok and said.startswith("503: ")
            assert orjson.loads(said[5:])["problems"] == ["agent_port: not accepting"]
            await until(lambda: relay._listeners[0].serving, 5, "the listener did not resume")
            assert (await probe(url))[0]

            # The command the image runs: exit status and what it prints.
            assert await asyncio.to_thread(healthcheck.main, [url]) == 0
            await agent.stop()
        await relay.stop()
        assert relay.health() == (False, {"status": "unavailable", "agents": 0,
                                          "problems": ["stopping", "database closed",
                                                       "agent_port: not accepting"]})
        assert await asyncio.to_thread(healthcheck.main, [url]) == 1
        out = capsys.readouterr().out.splitlines()
        assert orjson.loads(out[0])["status"] == "ok" and out[1].startswith(f"no answer from {url}")

    run(main())


def test_healthz_is_not_served_without_a_node():
    async def main():
        import socket

        from relayd import metrics

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        srv = await metrics.serve_metrics(sock)
        try:
            ok, said = await probe(f"http://127.0.0.1:{sock.getsockname()[1]}/healthz")
            assert not ok and said.startswith("404: ")
        finally:
            srv.close()

    run(main())
