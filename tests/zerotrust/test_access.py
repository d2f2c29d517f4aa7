"""Zero-trust access end to end on loopback: sign-in with a local user
(password and a TOTP code computed by pyotp), entitlement tokens, a session
at the site's gateway, flows allowed, denied and stepped up."""

import asyncio

import pytest

from relayd.net import run
from tests.zerotrust.stack import ADDRS, echo_through, site


def test_login_and_allowed_and_denied_flows(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            state = await asyncio.to_thread(s.login)
            assert state["username"] == "alice" and [x["id"] for x in state["sites"]] == ["s-lab"]
            c = await s.connector()
            try:
                assert await echo_through(c, "open", s)
                stream, reply = await c.open_flow(ADDRS["none"], s.ports["none"])
                assert stream is None and reply["r"] == "denied"
            finally:
                await c.close()

    run(main())


@pytest.mark.parametrize("kind", ["otp", "reason", "password", "fix"])
def test_each_interaction_completes_a_stepup(tmp_path, kind):
    """A flow blocked only by a condition with a user interaction: the
    gateway asks, the client answers (a TOTP code checked by the
    controller, a reason, the password again, the device fixed), and the
    same session's next try is allowed, without reconnecting."""

    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                mux_before = c.sessions["s-lab"].mux
                assert await echo_through(c, kind, s)
                assert [a[0] for a in c.prompter.asked] == ["message" if kind == "fix" else kind]
                assert c.sessions["s-lab"].mux is mux_before and not mux_before.closed
                assert await echo_through(c, kind, s)  # no second prompt
                assert len(c.prompter.asked) == 1
            finally:
                await c.close()

    run(main())


def test_info_message_is_shown_and_access_stays_denied(tmp_path):
    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                stream, reply = await c.open_flow(ADDRS["info"], s.ports["info"])
                assert stream is None and reply["r"] == "stepup_required"
                assert ("message", "info", "Only from the office") in c.prompter.asked
            finally:
                await c.close()

    run(main())


def test_socks5_and_forward_ports(tmp_path):
    """The client's local ways in: a SOCKS5 CONNECT (RFC 1928) to an
    allowed address echoes, one to an address no rule allows is answered
    'connection not allowed by ruleset' (2); a -L forward echoes."""

    async def main():
        async with site(tmp_path) as s:
            await asyncio.to_thread(s.login)
            c = await s.connector()
            try:
                srv = await c.socks(("127.0.0.1", 0))
                port = srv.sockets[0].getsockname()[1]
                for key, code in (("open", 0), ("none", 2)):
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    w.write(b"\x05\x01\x00")
                    assert await r.readexactly(2) == b"\x05\x00"
                    w.write(b"\x05\x01\x00\x01" + bytes(map(int, ADDRS[key].split("."))) +
                            s.ports[key].to_bytes(2, "big"))
                    reply = await r.readexactly(10)
                    assert reply[1] == code
                    if code == 0:
                        w.write(b"hello through socks")
                        assert await r.readexactly(19) == b"hello through socks"
                    w.close()
                fwd = await c.forward(("127.0.0.1", 0), ADDRS["open"], s.ports["open"])
                r, w = await asyncio.open_connection("127.0.0.1", fwd.sockets[0].getsockname()[1])
                w.write(b"x" * 100_000)
                w.write_eof()
                got = b""
                while data := await r.read(65536):
                    got += data
                assert got == b"x" * 100_000
                w.close()
            finally:
                await c.close()

    run(main())
