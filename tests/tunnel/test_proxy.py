"""Agents behind a forward proxy: a real tinyproxy (Debian package, installed
by scripts/test.sh) on loopback, with Basic proxy authentication."""

import os
import shutil
import signal
import subprocess

import pytest

from relayd.errors import AuthError
from relayd.net import run
from tests.tunnel.processes import free_port
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.waiting import listening, until_sync


@pytest.fixture
def tinyproxy(tmp_path):
    exe = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not os.path.exists(exe):
        pytest.fail("tinyproxy is needed (scripts/test.sh installs it): apt-get install tinyproxy")
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nLogLevel Connect\n"
        f'LogFile "{log}"\nAllow 127.0.0.1\nBasicAuth relay s3cret\nDisableViaHeader Yes\n')
    proc = subprocess.Popen([exe, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        until_sync(lambda: proc.poll() is not None or listening(port), 10, "tinyproxy did not start")
        if proc.poll() is not None:
            raise AssertionError(f"tinyproxy did not start: {log.read_text() if log.exists() else ''}")
        yield port, log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def test_agent_enrolls_and_tunnels_through_proxy(tmp_path, tinyproxy):
    port, log = tinyproxy

    async def main():
        relay = await start_relay(tmp_path)
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", join_token(relay), {"echo": ("127.0.0.1", svc)},
                                      proxy=f"http://relay:s3cret@127.0.0.1:{port}")
            assert await echo_ok(relay.tcp_ports["echo"], 1_000_000)
            await agent.stop()
        await relay.stop()

    run(main())
    # The relay was reached only through the proxy's CONNECT.
    text = log.read_text()
    assert f"CONNECT 127.0.0.1:" in text
    assert "s3cret" not in text


def test_wrong_proxy_credentials_refused_clearly(tmp_path, tinyproxy):
    port, _ = tinyproxy

    async def main():
        relay = await start_relay(tmp_path)
        agent = await _start_expect_failure(tmp_path, relay, f"http://relay:wrong@127.0.0.1:{port}")
        await relay.stop()
        return agent

    with pytest.raises(AuthError, match="refused the credentials"):
        run(main())


async def _start_expect_failure(tmp_path, relay, proxy):
    from relayd.agent import AgentNode
    from relayd.config import AgentConfig

    agent = AgentNode(AgentConfig(data=tmp_path / "a", join=join_token(relay), proxy=proxy,
                                  endpoints={"echo": ("127.0.0.1", 9)}))
    try:
        await agent.start()
    finally:
        await agent.stop()
    return agent
