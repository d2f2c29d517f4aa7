"""Device API users signed in at a real OpenID Connect provider (node's
oidc-provider, tests/interop/oidc, as the zero-trust tests run it): the
provider's ID token checked by its JWKS (iss, aud, exp) claims a device;
a token of the provider's second tenant (another issuer) and one for
another client are refused and counted."""

from __future__ import annotations

import pytest

from relayd.control.zerotrust import ZtConfig
from relayd.net import run
from tests.gateway.devices import relay_with_https
from tests.gateway.test_devicereg import call, enrolled_device
from tests.metric import value
from tests.tunnel.util import echo_ok, echo_service
from tests.waiting import until
from tests.zerotrust import test_oidc
from tests.zerotrust.test_oidc import authorize

pytestmark = pytest.mark.interop
provider_fixture = test_oidc.idp  # the real provider, one per module


def id_token(idp_, username: str, client: str = "relayd", issuer: str | None = None) -> str:
    from relayd.control.oidc import Provider

    acc = idp_.accounts[username]
    got = authorize(issuer or idp_.issuer, client, (username, acc["password"]))
    prov = Provider("p", issuer or idp_.issuer, client, idp_.clients[client])
    return prov.exchange(got["code"], got["code_verifier"], got["redirect_uri"])["id_token"]


def test_a_user_of_the_provider_claims_a_device(tmp_path, provider_fixture):
    idp = provider_fixture
    users = sorted(idp.accounts)
    assert len(users) >= 2

    async def main():
        relay = await relay_with_https(tmp_path, zerotrust=ZtConfig(providers={"corp": idp.provider()}))
        try:
            async with echo_service() as port:
                agent = await enrolled_device(tmp_path, relay, "cam", {"echo": ("127.0.0.1", port)})
                did = agent.identity["agent_id"]
                await until(agent.claim_code_file.exists, 10, "claim code")
                code = agent.claim_code_file.read_text().strip()
                token = await asyncio_thread(id_token, idp, users[0])
                status, me = await call(relay, "GET", "/users/me", token)
                assert status == 200 and me["iss"] == idp.issuer and me["sub"]
                # foreign tokens: the second tenant (its own issuer), and a token for another client
                foreign = await asyncio_thread(id_token, idp, users[0], "relayd", idp.tenant)
                before = value("relayd_user_auth_refusals_total", reason="issuer")
                assert (await call(relay, "GET", "/devices", foreign))[0] == 401
                assert value("relayd_user_auth_refusals_total", reason="issuer") == before + 1
                others = [c for c in idp.clients if c != "relayd"]
                if others:
                    aud = await asyncio_thread(id_token, idp, users[0], others[0])
                    before = value("relayd_user_auth_refusals_total", reason="audience")
                    assert (await call(relay, "GET", "/devices", aud))[0] == 401
                    assert value("relayd_user_auth_refusals_total", reason="audience") == before + 1
                status, doc = await call(relay, "POST", "/devices/claim", token, {"claim_code": code})
                assert (status, doc) == (200, {"device_id": did, "role": "owner"})
                await until(lambda: not agent.claim_code_file.exists(), 10, "claim code removed")
                status, lst = await call(relay, "GET", "/devices", token)
                assert [(d["id"], d["role"]) for d in lst["items"]] == [(did, "owner")]
                # another user of the provider sees nothing until shared
                token2 = await asyncio_thread(id_token, idp, users[1])
                other = (await call(relay, "GET", "/users/me", token2))[1]
                assert (await call(relay, "GET", f"/devices/{did}", token2))[0] == 404
                assert (await call(relay, "PUT", f"/devices/{did}/users/{other['id']}", token,
                                   {"role": "operator"}))[0] == 200
                assert (await call(relay, "GET", f"/devices/{did}", token2))[1]["role"] == "operator"
                assert await echo_ok(relay.tcp_ports["echo"])
                await agent.stop()
        finally:
            await relay.stop()

    run(main())


async def asyncio_thread(fn, *args):
    import asyncio

    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 30)
