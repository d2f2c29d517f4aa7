"""Revocation in real time: kill cuts live flows within a second, lock
refuses sign-in until it expires, renew makes the client take new tokens
without breaking its flows, and a kill from `relayd admin revoke` (another
process) reaches the running relay through its poll."""

import asyncio
import subprocess
import sys
import time

import pytest

from relayd.client.zerotrust import ZtClientError
from relayd.net import run
from tests.zerotrust.stack import ADDRS, echo_through, site


async def _live_flow(c, s):
    stream, reply = await c.open_flow(ADDRS["open"], s.ports["open"])
    assert reply["r"] == "ok"
    await stream.write(b"ping")
    assert await stream.read(4) == b"ping"
    return stream


async def _cut_within(stream, seconds: float) -> float:
    t0 = time.monotonic()

    async def ends():
        try:
            while await stream.read(65536):
                pass
        except Exception:
            pass

    await asyncio.wait_for(ends(), seconds)
    return time.monotonic() - t0


async def _ended_at(stream) -> float:
    """The wall-clock time the stream ends."""
    try:
        while await stream.read(65536):
            pass
    except Exception:
        pass
    return time.time()


@pytest.mark.parametrize("how", ["api", "cli"])
def test_kill_cuts_live_flows_within_one_second(tmp_path, how):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                stream = await _live_flow(c, s)
                ended = asyncio.ensure_future(_ended_at(stream))
                if how == "api":
                    await asyncio.to_thread(s.ctl.revoke, "kill", {"user": ["local", "alice"]}, reason="test")
                else:
                    await asyncio.to_thread(subprocess.run, [
                        sys.executable, "-m", "relayd.cli", "admin", "revoke", "kill", "--user", "alice",
                        "--reason", "test", "--data", str(s.relay.data)], check=True, capture_output=True)
                # within a second of the kill's write (for the CLI: however long its interpreter took to start)
                written = s.ctl.zs.revocations()[-1]["effective_at"]
                assert await asyncio.wait_for(ended, 5) - written < 1.0
                await asyncio.sleep(0.2)
                assert c.prompter.closed_with and c.prompter.closed_with[0][0] == "revoked"
                # The old tokens are refused at the controller too; a new sign-in works.
                with pytest.raises(ZtClientError) as e:
                    await asyncio.to_thread(__import__("relayd.client.zerotrust", fromlist=["renew"]).renew,
                                            c.st, c.state)
                assert e.value.reason in ("revoked", "session_revoked")
            finally:
                await c.close()
            if how == "api":
                # Tokens issued up to 5 s after a kill are covered (controller
                # clock skew); after that the user may sign in again.
                await asyncio.sleep(6.2)  # (token times are whole seconds)
                await asyncio.to_thread(s.login, otp=s.totp.at(time.time() + 30))

    run(main())


def test_lock_refuses_sign_in_until_it_expires(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            await asyncio.to_thread(s.ctl.revoke, "lock", {"user": ["local", "alice"]}, until=time.time() + 2,
                                    reason="investigation")
            with pytest.raises(ZtClientError) as e:
                await asyncio.to_thread(s.login, otp=s.totp.at(time.time() + 30))
            assert e.value.reason == "locked" and "investigation" in str(e.value)
            await asyncio.sleep(6.2)  # the lock's end, and the 5 s the kill in it covers
            await asyncio.to_thread(s.login, otp=s.totp.at(time.time() + 30))

    run(main())


def test_silent_renewal_keeps_flows_and_old_tokens_die_at_the_deadline(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                stream = await _live_flow(c, s)
                old = dict(c.state)
                await asyncio.sleep(1.1)  # token times are whole seconds: renew covers those of earlier seconds
                await asyncio.to_thread(s.ctl.revoke, "renew", {"user": ["local", "alice"]}, delay=1.5,
                                        reason="policy change")
                for _ in range(100):
                    if c.state["claims"] != old["claims"]:
                        break
                    await asyncio.sleep(0.05)
                assert c.state["claims"] != old["claims"]
                await asyncio.sleep(2.0)  # past the deadline
                await stream.write(b"pong")
                assert await stream.read(4) == b"pong"  # the flow lived on
                assert await echo_through(c, "open", s)  # and new flows pass
                assert not c.prompter.closed_with
                from relayd.control import jws

                with pytest.raises(Exception) as e:  # the old claims token no longer passes
                    s.ctl.check_token(old["claims"], jws.CLAIMS, None)
                assert "certificate" in str(e.value) or "revoked" in str(e.value)
            finally:
                await c.close()

    run(main())


def test_device_removal_and_policy_reevaluation_cut_flows(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                stream = await _live_flow(c, s)
                dev = c.state_device = c.st.device_id()
                await asyncio.to_thread(s.ctl.remove_device, dev)
                await _cut_within(stream, 1.5)
            finally:
                await c.close()

    run(main())
