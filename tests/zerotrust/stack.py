"""A zero-trust site on loopback for the tests: a relay (controller and the
gateway of site s-lab) with its HTTPS port, an agent of the site that may
reach 127.0.0.0/8, echo services on their own loopback addresses, a local
user with an authenticator, and a policy with one entitlement per kind of
condition."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyotp

from relayd.client import zerotrust as zc
from relayd.control.policy import Policy
from relayd.control.zerotrust import Controller, ZtConfig
from relayd.control.ztstore import ZtStore
from tests.tunnel.util import join_token, start_agent, start_relay

PASSWORD = "correct horse battery"
#: Loopback addresses of the services, by what guards them.
ADDRS = {"open": "127.0.0.2", "otp": "127.0.0.3", "none": "127.0.0.4", "reason": "127.0.0.5", "password": "127.0.0.6",
         "fix": "127.0.0.7", "info": "127.0.0.8"}


def policy_doc() -> dict:
    def ent(eid, key, conds=()):
        return {"id": eid, "site": "s-lab", "conditions": list(conds), "tags": ["lab"],
                "actions": [{"action": "allow", "proto": "tcp", "hosts": [ADDRS[key]], "ports": ["1024-65535"]}]}

    return {
        "sites": [{"id": "s-lab", "networks": ["127.0.0.0/8"]}],
        "conditions": [
            {"id": "c-otp", "criteria": [{"stepup": "otp", "suffix": "lab", "provider": "totp", "max_age": "10m"}],
             "remedies": [{"type": "otp", "provider": "totp", "suffix": "lab", "message": "Authenticator code"}]},
            {"id": "c-reason", "criteria": [{"reason": True, "suffix": "why", "max_age": "10m", "min_len": 5}],
             "remedies": [{"type": "reason", "suffix": "why", "message": "Why do you need this?"}]},
            {"id": "c-password", "criteria": [{"stepup": "password", "suffix": "pw", "provider": "local",
                                               "max_age": "10m"}],
             "remedies": [{"type": "password", "provider": "local", "suffix": "pw", "message": "Password again"}]},
            {"id": "c-fix", "criteria": [{"claim": "device.av.enabled", "op": "eq", "value": True}],
             "remedies": [{"type": "message", "kind": "fix", "message": "Turn the antivirus on"}]},
            {"id": "c-info", "criteria": [{"claim": "system.client_src_ip", "op": "cidr", "value": "192.0.2.0/24"}],
             "remedies": [{"type": "message", "kind": "info", "message": "Only from the office"}]},
        ],
        "entitlements": [ent("e-open", "open"), ent("e-otp", "otp", ["c-otp"]),
                         ent("e-reason", "reason", ["c-reason"]), ent("e-password", "password", ["c-password"]),
                         ent("e-fix", "fix", ["c-fix"]), ent("e-info", "info", ["c-info"])],
        "policies": [{"id": "p-staff", "match": {"criteria": [{"claim": "user.groups", "op": "contains",
                                                                "value": "staff"}]},
                      "entitlement_tags": ["lab"]}],
    }


class TestPrompter(zc.Prompter):
    """Answers interactions as a user would, and records them."""

    def __init__(self, site: "Site") -> None:
        self.site = site
        self.asked: list = []
        self.closed_with: list = []
        self.fixed = {"os": {"family": "linux"}, "av": {"enabled": True}}

    async def otp(self, message):
        self.asked.append(("otp", message))
        # The next step's code (the controller accepts one step of drift):
        # the sign-in spent the current one.
        return self.site.totp.at(time.time() + 30)

    async def password(self, message):
        self.asked.append(("password", message))
        return PASSWORD

    async def reason(self, message):
        self.asked.append(("reason", message))
        return "ticket OPS-42: restore the backup"

    async def message(self, kind, message):
        self.asked.append(("message", kind, message))

    def device_claims(self):
        return self.fixed

    async def closed(self, site, reason, message):
        self.closed_with.append((reason, message))


@dataclass
class Site:
    tmp: Path
    relay: object = None
    agent: object = None
    servers: dict = field(default_factory=dict)
    ports: dict = field(default_factory=dict)
    totp: pyotp.TOTP | None = None
    ctl: Controller | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.relay.https_port}"

    def login(self, name: str = "alice", data: str = "client", **kw) -> dict:
        kw.setdefault("otp", self.totp.now())
        return zc.login(self.tmp / data, self.url, username=name, password=PASSWORD, ca_file=str(self.relay.ca_path),
                        device_claims={"os": {"family": "linux"}}, **kw)

    async def connector(self, data: str = "client") -> zc.Connector:
        p = TestPrompter(self)
        c = zc.Connector(self.tmp / data, p, device_claims={"os": {"family": "linux"}})
        await c.start()
        return c


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def site(tmp: Path, **zt):
    from relayd.control import totp as rtotp

    cfg = ZtConfig(site="s-lab", **zt)
    relay = await start_relay(tmp, endpoints=(), https=("127.0.0.1", 0), zerotrust=cfg)
    s = Site(tmp, relay)
    s.ctl = relay.zt.ctl
    zs = ZtStore(relay.store)
    zs.import_policy(Policy.from_doc(policy_doc()))
    secret = s.ctl.add_user("alice", PASSWORD, groups=["staff"], with_totp=True)
    s.ctl.add_user("bob", PASSWORD, groups=["visitors"])
    assert rtotp.code_at(secret, 1) == pyotp.TOTP(secret).at(30)
    s.totp = pyotp.TOTP(secret)
    for key, addr in ADDRS.items():
        srv = await asyncio.start_server(_echo, addr, 0)
        s.servers[key] = srv
        s.ports[key] = srv.sockets[0].getsockname()[1]
    s.agent = await start_agent(tmp, "agent", join_token(relay), {}, site="s-lab",
                                site_networks=[__import__("ipaddress").ip_network("127.0.0.0/8")])
    try:
        yield s
    finally:
        await s.agent.stop()
        await relay.stop()
        for srv in s.servers.values():
            srv.close()


async def echo_through(c: zc.Connector, key: str, site: Site, size: int = 100_000) -> bool:
    stream, reply = await c.open_flow(ADDRS[key], site.ports[key])
    if stream is None:
        return False
    payload = os.urandom(size)
    await stream.write(payload)
    stream.write_eof()
    got = b""
    while data := await stream.read(65536):
        got += data
    return got == payload
