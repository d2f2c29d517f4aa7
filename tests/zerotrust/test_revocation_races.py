"""Revocation races of the spec's section 10: a kill racing a renewal or a
step-up leaves no token that passes, whatever the order; strict mode
refuses new sessions and flows while the gateway's revocation view is
stale and serves again once it is fresh; removing a user's authenticator
kills the sessions it backed. (Revocation entries reach gateways by their
sequence number from the store, read whole by each poll: there is no bus
whose messages could be lost yet; the scale-out issue brings one.)"""

import asyncio
import threading
import time

from relayd.client import zerotrust as zc
from relayd.client.zerotrust import ZtClientError
from relayd.control import jws
from relayd.control.zerotrust import Refused
from relayd.errors import RelaydError
from relayd.net import run
from tests.zerotrust.stack import ADDRS, echo_through, site


def _race(a, b) -> list:
    """Run ``a`` and ``b`` in two threads started together; their results
    or exceptions."""
    out = [None, None]
    go = threading.Barrier(2)

    def runner(i, fn):
        go.wait()
        try:
            out[i] = fn()
        except Exception as exc:  # the refusal is a result here
            out[i] = exc

    ts = [threading.Thread(target=runner, args=(i, fn)) for i, fn in enumerate((a, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return out


def _passes(ctl, token, typ, der=None) -> bool:
    try:
        ctl.check_token(token, typ, der)
        return True
    except Refused:
        return False


def test_a_kill_racing_a_renewal_or_a_step_up_leaves_no_token_that_passes(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            for round_, racer in enumerate(("renew", "stepup")):
                # A sign-in per round: the authenticator's next step for the second.
                state = await asyncio.to_thread(s.login, data=f"client{round_}", otp=s.totp.at(time.time() + 30 * round_))
                st = zc.ClientState(s.tmp / f"client{round_}")

                def other():
                    if racer == "renew":
                        return zc.renew(st, state)
                    ctl = zc.Controller(state["url"], str(st.path("relay-ca.pem")), str(st.path("cert.pem")),
                                        str(st.path("key.pem")))
                    return ctl.call("POST", "/stepup", {"method": "password", "suffix": "pw", "provider": "local",
                                                        "credential": "correct horse battery"}, state["claims"])

                kill, res = await asyncio.to_thread(
                    _race, lambda: s.ctl.revoke("kill", {"user": ["local", "alice"]}, reason="race"), other)
                assert not isinstance(kill, Exception), kill
                tokens = [state["claims"]]
                if isinstance(res, dict):  # the other side won the race: what it got must die too
                    tokens.append(res.get("claims") or res.get("claims_token"))
                else:
                    assert isinstance(res, ZtClientError) and res.reason in ("revoked", "session_revoked"), res
                for tok in tokens:
                    assert not _passes(s.ctl, tok, jws.CLAIMS), (racer, round_)
                await asyncio.sleep(6.2)  # past the kill's 5 s skew and a whole second: the next sign-in is not covered

    run(main())


def test_strict_mode_refuses_while_the_revocation_view_is_stale(tmp_path):
    async def main():
        async with site(tmp_path, max_staleness=0.5) as s:
            gw = s.relay.zt
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                assert await echo_through(c, "open", s)
                gw._poll_task.cancel()  # the store cannot be read (as in an outage): no fresh view
                await asyncio.sleep(0.8)
                stream, reply = await c.open_flow(ADDRS["open"], s.ports["open"])
                assert stream is None and reply.get("why") == "stale_revocations", reply
                with_stale = zc.Connector(s.tmp / "client", c.prompter, device_claims={"os": {"family": "linux"}})
                try:
                    await with_stale.start()
                    raise AssertionError("a new session was let in with a stale view")
                except ZtClientError as exc:
                    assert exc.reason in ("stale_revocations", "unreachable"), exc
                gw.start()  # the store answers again
                await asyncio.sleep(0.5)
                assert await echo_through(c, "open", s)
            finally:
                await c.close()

    run(main())


def test_removing_the_authenticator_kills_the_sessions_it_backed(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                stream, reply = await c.open_flow(ADDRS["open"], s.ports["open"])
                assert reply["r"] == "ok"
                t0 = time.monotonic()
                await asyncio.to_thread(s.ctl.reset_user, "alice", totp_off=True)
                try:
                    while await stream.read(65536):
                        pass
                except RelaydError:
                    pass  # reset: the flow was cut
                assert time.monotonic() - t0 < 1.5
                assert await asyncio.wait_for(c.keepers["s-lab"], 5) == "revoked"
            finally:
                await c.close()

    run(main())
