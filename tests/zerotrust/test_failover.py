"""A site with two gateways (two relays on one data directory, each with
an agent of the site): `relayd connect` fails over to the second when the
first stops, flows work again there, and a kill made while the client is
between gateways is refused by the second (spec section 10, "kill on
gateway A while the client fails over to gateway B")."""

from __future__ import annotations

import asyncio
import ipaddress

from relayd.control.policy import Policy
from relayd.control.zerotrust import ZtConfig
from relayd.control.ztstore import ZtStore
from relayd.net import run
from tests.tunnel.util import join_token, start_agent, start_relay
from tests.waiting import until
from tests.zerotrust.stack import echo_through, policy_doc, site


async def second_gateway(s):
    """Relay B on relay A's data directory, an agent of the site on it, and
    the site's gateways in the policy: A first, then B."""
    b = await start_relay(s.tmp, endpoints=(), https=("127.0.0.1", 0), zerotrust=ZtConfig(site="s-lab"))
    agent_b = await start_agent(s.tmp, "agent-b", join_token(b), {}, site="s-lab",
                                site_networks=[ipaddress.ip_network("127.0.0.0/8")])
    doc = policy_doc()
    doc["sites"][0]["gateways"] = [f"127.0.0.1:{s.relay.https_port}", f"127.0.0.1:{b.https_port}"]
    ZtStore(s.relay.store).import_policy(Policy.from_doc(doc))
    return b, agent_b


def test_the_client_fails_over_to_the_next_gateway(tmp_path):
    run(_fails_over(tmp_path))


async def _fails_over(tmp_path):
    async with site(tmp_path) as s:
        b, agent_b = await second_gateway(s)
        try:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                sess = c.sessions["s-lab"]
                assert sess.connected_to == ("127.0.0.1", s.relay.https_port)
                assert await echo_through(c, "open", s)
                await s.agent.stop()
                await s.relay.stop()  # gateway A goes away
                await until(lambda: sess.reconnects == 1 or None, 15, "the client did not connect again")
                assert sess.connected_to == ("127.0.0.1", b.https_port)
                assert await echo_through(c, "open", s)
                assert not c.keepers["s-lab"].done()
            finally:
                await c.close()
        finally:
            await agent_b.stop()
            await b.stop()


def test_a_kill_while_failing_over_is_refused_by_the_next_gateway(tmp_path):
    run(_kill_while_failing_over(tmp_path))


async def _kill_while_failing_over(tmp_path):
    async with site(tmp_path) as s:
        b, agent_b = await second_gateway(s)
        try:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                sess = c.sessions["s-lab"]
                # Gateway A goes away, and the administrator kills the user's
                # tokens at A before the client is at gateway B: B must know
                # (the revocation log is shared).
                s.relay.zt.stop()  # A's sessions end: the client goes to B in 0.5 s
                await asyncio.to_thread(s.ctl.revoke, "kill", {"user": ["local", "alice"]},
                                        reason="failover test")
                await s.agent.stop()
                await s.relay.stop()
                reason = await asyncio.wait_for(c.keepers["s-lab"], 15)
                assert reason == "revoked"
                assert sess.reconnects == 0
                assert ("revoked", ) == tuple(x[0] for x in c.prompter.closed_with[-1:])
            finally:
                await c.close()
        finally:
            await agent_b.stop()
            await b.stop()
