"""Label cardinality with a fleet of devices (issue 14): no metric family
carries a label whose values come from the population (an agent, a device,
a user, an address, a path a client chose, a token), and a relay's series do
not grow with the number of agents and devices connected. Per-agent numbers
live in the store (``relayd admin agents``, the admin API), not in metrics.
The gauges that replaced the per-agent one are checked on the way: agents
per endpoint, devices online, the certificate expiry gauges. The relay does
this with 10,000 registered devices in its database, none of which any
series names."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
import time

import pytest
from prometheus_client import REGISTRY

import relayd
from relayd.gateway import agents as agents_mod
from relayd.net import run
from tests.gateway.devices import relay_with_https, start_device
from tests.metric import value
from tests.tunnel.util import echo_ok, echo_service
from tests.waiting import until

#: Label names whose values would come from the population or from clients.
DENIED = {"agent", "agent_id", "device", "device_id", "user", "user_id", "username", "sub", "email", "client",
          "client_id", "address", "addr", "peer", "ip", "remote", "remote_addr", "port", "path", "url", "uri",
          "host", "token", "jti", "otp", "key", "trace", "trace_id", "session", "session_id", "sid", "stream",
          "stream_id", "listener_id", "tracking_id", "serial", "webhook", "webhook_id", "event_id"}


def _relayd_families():
    for mod in pkgutil.walk_packages(relayd.__path__, "relayd."):
        if not mod.name.endswith(("_c", "__main__")):
            importlib.import_module(mod.name)  # every module's metrics registered
    return [m for m in REGISTRY.collect() if m.name.startswith("relayd_")]


def test_no_metric_family_has_a_population_label():
    families = _relayd_families()
    assert len(families) > 40
    bad = {}
    for fam in families:
        collector = REGISTRY._names_to_collectors.get(fam.name) or REGISTRY._names_to_collectors.get(
            fam.name + "_total")
        names = set(getattr(collector, "_labelnames", ()))
        names |= {k for s in fam.samples for k in s.labels if k not in ("le", "quantile")}
        if names & DENIED:
            bad[fam.name] = sorted(names & DENIED)
    assert not bad, f"labels that grow with agents, devices, users or clients: {bad}"


def _series() -> set:
    return {(s.name, tuple(sorted(s.labels.items()))) for fam in REGISTRY.collect()
            if fam.name.startswith("relayd_") for s in fam.samples}


#: The fleet the issue names: registered devices that no series may name.
FLEET = 10_000


def _register_fleet(store, n: int) -> set[str]:
    """``n`` enrolled devices (agents with a dc_devices row, as EST enrollment
    makes them), offline; their ids."""
    ids = {f"dv-{i:012x}" for i in range(n)}
    for i, agent_id in enumerate(sorted(ids)):
        store.add_agent(agent_id, ["device"], 10**9 + i, time.time() + 86400)
        store.register_device(agent_id, f"cam-{i}")
    return ids


@pytest.mark.once
def test_series_do_not_grow_with_agents_and_devices(tmp_path, monkeypatch):
    monkeypatch.setattr(agents_mod, "STATUS_INTERVAL", 0.1)

    async def main():
        async with echo_service() as svc:
            relay = await relay_with_https(tmp_path, agent_cert_ttl=3600.0)
            fleet = []
            try:
                base_devices = value("relayd_devices_online")
                # A fleet of 10,000 registered devices in the relay's database
                # (enrolled, offline): no series may name one, and the relay
                # serves the online ones below as usual.
                fleet_ids = await asyncio.to_thread(_register_fleet, relay.store, FLEET)
                for i in range(2):  # one agent, one device: every kind of series exists
                    fleet.append(await start_device(tmp_path, relay, f"a{i}", {"echo": ("127.0.0.1", svc)},
                                                    device=bool(i)))
                assert await echo_ok(relay.tcp_ports["echo"])
                await until(lambda: value("relayd_agent_certificate_expiry_earliest_timestamp_seconds",
                                          kind="device"), 5, "no device certificate expiry")
                before = _series()
                for i in range(2, 26):  # 24 more, half of them devices, streams through all of them
                    fleet.append(await start_device(tmp_path, relay, f"a{i}", {"echo": ("127.0.0.1", svc)},
                                                    device=bool(i % 2)))
                assert all(await asyncio.gather(*(echo_ok(relay.tcp_ports["echo"], 20_000) for _ in range(40))))
                await until(lambda: value("relayd_devices_online") - base_devices == 13, 5,
                            lambda: f"devices online: {value('relayd_devices_online') - base_devices}")
                assert value("relayd_endpoint_agents", endpoint="echo") == 26
                grown = _series() - before
                assert not grown, f"series that came with more agents: {sorted(grown)[:10]}"
                assert len(relay.seam._children) == 1  # the metric children cached per endpoint only
                values = {v for fam in REGISTRY.collect() if fam.name.startswith("relayd_")
                          for smp in fam.samples for v in smp.labels.values()}
                named = values & (fleet_ids | {f"cam-{i}" for i in range(FLEET)})
                assert not named, f"series that name registered devices: {sorted(named)[:5]}"
                for kind in ("agent", "device"):
                    t = value("relayd_agent_certificate_expiry_earliest_timestamp_seconds", kind=kind)
                    assert time.time() + 3000 < t < time.time() + 3700, (kind, t)
                for cert in ("ca", "server", "user_ca"):  # years away (the server's: 397 days)
                    ends = [s.value for fam in REGISTRY.collect() for s in fam.samples
                            if s.name == "relayd_certificate_expiry_timestamp_seconds" and s.labels["cert"] == cert]
                    assert ends and min(ends) > time.time() + 300 * 86400, cert
            finally:
                for agent in fleet:
                    await agent.stop()
            await until(lambda: value("relayd_endpoint_agents", endpoint="echo") == 0, 5)
            assert value("relayd_devices_online") == base_devices
            # No agent connected: no earliest expiry to report (not a stale one).
            await until(lambda: not value("relayd_agent_certificate_expiry_earliest_timestamp_seconds",
                                          kind="device"), 5, "the device certificate expiry outlived the devices")
            await relay.stop()

    run(main())


def test_every_caught_place_has_its_series_from_the_start():
    """relayd_internal_errors_total{where} exists at 0 for each place that
    calls relayd.log.caught, so that the RelaydInternalErrors alert has data
    before the first bug (configs/prometheus/relayd-alerts.yml)."""
    import pathlib
    import re

    from relayd import metrics

    root = pathlib.Path(relayd.__file__).parent
    used = {m for p in root.rglob("*.py") for m in re.findall(r'caught\("([a-z_]+)"', p.read_text())}
    assert used == set(metrics.CAUGHT_AT), f"relayd.metrics.CAUGHT_AT must list exactly {sorted(used)}"
    assert all(REGISTRY.get_sample_value("relayd_internal_errors_total", {"where": w}) is not None for w in used)
