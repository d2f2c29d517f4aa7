"""The relay node's own rules: the store is never called on the event loop
(a write fsyncs; a loop stalled on the disk stalls every link)."""

import threading

from relayd.net import run
from tests.tunnel.util import echo_ok, echo_service, join_token, start_agent, start_relay
from tests.waiting import until


def test_store_is_never_called_on_the_event_loop(tmp_path):
    async def main():
        relay = await start_relay(tmp_path)
        token = join_token(relay)  # the test's own call, before the spy
        loop_thread = threading.get_ident()
        calls = []
        real = relay.db.store

        class Spy:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr):
                    return attr

                def wrapped(*args, **kwargs):
                    calls.append((name, threading.get_ident() == loop_thread))
                    return attr(*args, **kwargs)

                return wrapped

        relay.db.store = Spy()  # what every part of the node calls the store through
        async with echo_service() as svc:
            agent = await start_agent(tmp_path, "a1", token, {"echo": ("127.0.0.1", svc)})
            assert await echo_ok(relay.tcp_ports["echo"])
            await agent.renew()
            expected = {"check_join_token", "enroll_agent", "is_revoked", "get_agent", "update_agent_cert",
                        "revision", "set_agent_statuses"}  # revision: the revocation poll (every second)
            await until(lambda: expected <= {n for n, _ in calls}, 10,
                        lambda: f"store calls seen: {sorted({n for n, _ in calls})}")
            writes = lambda: sum(n == "set_agent_statuses" for n, _ in calls)
            before = writes()
            await agent.stop()
            await until(lambda: writes() > before, 5, "the agent's disconnect was not written")
        assert [n for n, on_loop in calls if on_loop] == []
        relay.db.store = real
        await relay.stop()

    run(main())
