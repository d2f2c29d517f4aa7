"""configs/: every file is loaded by the tool that will read it in
production, so that the examples cannot rot (issue 14). The TOML files go
through relayd's own config loader, the policy through the policy importer,
the systemd units through `systemd-analyze verify` and a hardening check,
the Prometheus files through `promtool`, the Grafana dashboard through a
check of its JSON model; every metric either names is one relayd exports.
A file nobody checks fails test_every_file_is_checked.

The slow half (the relay and agents started from these files, Prometheus
evaluating every query and alert against them) is tests/ops/test_prometheus.py.
"""

from __future__ import annotations

import configparser
import importlib
import json
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import relayd
from relayd import cli
from relayd.config import load_agent, load_serve

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RELAYD = Path(sys.executable).with_name("relayd")  # the entry point of the environment under test

#: Each file of configs/ and the test that checks it.
CHECKED_BY = {
    "relay.toml": "test_relay_configs_load",
    "hybrid.toml": "test_relay_configs_load",
    "acme.toml": "test_relay_configs_load",
    "zerotrust/relay.toml": "test_relay_configs_load",
    "agent.toml": "test_agent_configs_load",
    "device-agent.toml": "test_agent_configs_load",
    "zerotrust/agent.toml": "test_agent_configs_load",
    "zerotrust/policy.toml": "test_the_policy_imports",
    "systemd/relayd.service": "test_systemd_units",
    "systemd/relayd-agent.service": "test_systemd_units",
    "systemd/sysusers.d/relayd.conf": "test_sysusers",
    "prometheus/prometheus.yml": "test_prometheus_config",
    "prometheus/relayd-alerts.yml": "test_prometheus_rules",
    "grafana/relayd.json": "test_grafana_dashboard",
    "compose.yaml": "test_compose_commands",  # the container image's (issue 14 item 1)
}


def test_every_file_is_checked():
    files = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*") if p.is_file())
    unchecked = [f for f in files if f not in CHECKED_BY]
    assert not unchecked, f"files in configs/ that no test loads (add them to CHECKED_BY): {unchecked}"
    module = sys.modules[__name__]
    assert all(callable(getattr(module, name, None)) for name in CHECKED_BY.values())
    # test_prometheus.py starts real processes from these:
    from tests.ops import test_prometheus

    assert set(test_prometheus.STARTED) <= set(files)


# -- TOML: relayd's own loader ---------------------------------------------------------------


def test_relay_configs_load():
    relay = load_serve(CONFIGS / "relay.toml").validate()
    assert relay.tcp and relay.http and relay.metrics and relay.https and relay.hostname
    assert relay.metrics[0] == "127.0.0.1"  # the metrics listener has no authentication
    hybrid = load_serve(CONFIGS / "hybrid.toml").validate()
    assert set(hybrid.hybrid.connections) == {"orders", "telemetry/ingest"} and hybrid.hybrid.rules
    assert all(r.primary_key.startswith("REPLACE-") for hc in hybrid.hybrid.connections.values()
               for r in hc.rules + tuple(hybrid.hybrid.rules)), "example keys must read as placeholders"
    acme = load_serve(CONFIGS / "acme.toml").validate()
    assert acme.acme.directory.startswith("https://") and acme.acme.challenge == "http-01" and acme.https
    zt = load_serve(CONFIGS / "zerotrust/relay.toml").validate()
    assert zt.zerotrust.site == "s-lab" and "site:s-lab" in zt.endpoints and "corp" in zt.zerotrust.providers
    policy = tomllib.loads((CONFIGS / "zerotrust/policy.toml").read_text())
    assert zt.zerotrust.site in {s["id"] for s in policy["sites"]}


def test_agent_configs_load():
    agent = load_agent(CONFIGS / "agent.toml").validate()
    relay = load_serve(CONFIGS / "relay.toml")
    assert set(agent.endpoints) == set(relay.endpoints), "the agent serves what the relay example offers"
    device = load_agent(CONFIGS / "device-agent.toml").validate()
    assert "device" in device.endpoints and device.device_api[0] == "127.0.0.1"
    site = load_agent(CONFIGS / "zerotrust/agent.toml").validate()
    zt = load_serve(CONFIGS / "zerotrust/relay.toml")
    assert site.site == zt.zerotrust.site and site.site_networks
    policy = tomllib.loads((CONFIGS / "zerotrust/policy.toml").read_text())
    assert [str(n) for n in site.site_networks] == policy["sites"][0]["networks"]


def test_the_policy_imports(tmp_path):
    """What `relayd admin policy import` does, on a fresh data directory;
    the export reads back the same policy (test_prometheus.py imports it
    with the command itself into a running relay)."""
    from relayd.control import policy as pol
    from relayd.control.store import open_data_dir
    from relayd.control.ztstore import ZtStore

    doc = tomllib.loads((CONFIGS / "zerotrust/policy.toml").read_text())
    _ca, store = open_data_dir(tmp_path / "relay", create=True)
    try:
        zs = ZtStore(store)
        pv = zs.import_policy(pol.Policy.from_doc(doc))
        assert pv >= 1
        again = pol.Policy.from_doc(tomllib.loads(pol.to_toml(zs.policy().to_doc())))
        assert set(again.entitlements) == {"e-lab-web", "e-lab-db"} and set(again.policies) == {"p-engineering",
                                                                                                  "p-dba"}
    finally:
        store.close()


# -- systemd --------------------------------------------------------------------------------

#: What each unit must say: the hardening of issue 14, and the config it runs.
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
             "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
             "ProtectControlGroups": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
             "MemoryDenyWriteExecute": "yes", "RestrictNamespaces": "yes", "SystemCallArchitectures": "native",
             "UMask": "0077"}
UNITS = {"relayd.service": ("relayd", "serve", "relay.toml", "CAP_NET_BIND_SERVICE"),
         "relayd-agent.service": ("relayd-agent", "agent", "agent.toml", "")}


def _unit(path: Path) -> configparser.ConfigParser:
    p = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    p.optionxform = str  # keys are case-sensitive
    p.read_string(path.read_text())
    return p


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_units(name, tmp_path):
    user, command, config, caps = UNITS[name]
    unit = _unit(CONFIGS / "systemd" / name)
    svc = unit["Service"]
    for key, want in HARDENING.items():
        assert svc.get(key) == want, f"{name}: {key}={svc.get(key)!r}, want {want}"
    assert svc["User"] == user and svc["Group"] == user, "a dedicated user"
    # The data directory is the only writable place: StateDirectory under ProtectSystem=strict.
    assert svc["StateDirectory"] == user and svc["StateDirectoryMode"] == "0700"
    assert "ReadWritePaths" not in svc or svc["ReadWritePaths"] == f"/var/lib/{user}"
    assert svc["CapabilityBoundingSet"] == caps and svc.get("AmbientCapabilities", "") == caps
    assert "AF_NETLINK" not in svc["RestrictAddressFamilies"] and "AF_PACKET" not in svc["RestrictAddressFamilies"]
    # TimeoutStopSec leaves the drain time to open streams.
    drain = (load_serve if command == "serve" else load_agent)(CONFIGS / config).drain
    assert float(svc["TimeoutStopSec"].rstrip("s")) > drain + 5
    # The command line is relayd's, and the config it names is the example's.
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/opt/relayd/bin/relayd" and argv[1] == command
    args = cli.build_parser().parse_args(argv[1:])
    assert args.config == f"/etc/relayd/{config}"
    args.config = str(CONFIGS / config)
    (cli.serve_config if command == "serve" else cli.agent_config)(args)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the keys above were checked")
    # verify checks every key and that ExecStart's program exists: point it at this environment's relayd.
    copy = tmp_path / name
    copy.write_text((CONFIGS / "systemd" / name).read_text().replace("/opt/relayd/bin/relayd", str(RELAYD)))
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    # systemd's own exposure score (0-10, lower is better): "OK" is below 2.
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(copy)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr


def test_sysusers(tmp_path):
    lines = [ln.split() for ln in (CONFIGS / "systemd/sysusers.d/relayd.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert {(ln[0], ln[1]) for ln in lines} == {("u", u) for u, *_ in UNITS.values()}
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    res = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={tmp_path}",
                          str(CONFIGS / "systemd/sysusers.d/relayd.conf")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for user, *_ in UNITS.values():
        assert f"Creating user '{user}'" in res.stdout + res.stderr


# -- Prometheus and Grafana -------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian package prometheus; scripts/test.sh "
                                           "installs it)")


@needs_promtool
def test_prometheus_config():
    res = subprocess.run(["promtool", "check", "config", str(CONFIGS / "prometheus/prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = yaml.safe_load((CONFIGS / "prometheus/prometheus.yml").read_text())
    assert "relayd-alerts.yml" in doc["rule_files"]
    job = [j for j in doc["scrape_configs"] if j["job_name"] == "relayd"]
    assert job, "the dashboard and the alerts select job=relayd"
    relay = load_serve(CONFIGS / "relay.toml")
    assert f"{relay.metrics[0]}:{relay.metrics[1]}" in job[0]["static_configs"][0]["targets"]


@needs_promtool
def test_prometheus_rules():
    res = subprocess.run(["promtool", "check", "rules", str(CONFIGS / "prometheus/relayd-alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names))
    assert {"RelaydDown", "RelaydEndpointWithoutAgent", "RelaydPublicConnectionsRefused",
            "RelaydCertificateExpiresSoon", "RelaydAgentCertificateExpiresSoon"} <= set(names)
    for r in alert_rules():
        assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]
        unknown = metric_names(r["expr"]) - exported()
        assert not unknown, f"{r['alert']} uses metrics relayd does not export: {unknown}"


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((CONFIGS / "prometheus/relayd-alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard() -> dict:
    return json.loads((CONFIGS / "grafana/relayd.json").read_text())


def dashboard_queries(dash: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel."""
    dash = dash or dashboard()
    out = []
    for p in dash["panels"]:
        for inner in [p] + p.get("panels", []):
            out += [(inner["title"], t["expr"]) for t in inner.get("targets", [])]
    return out


def template_queries(dash: dict | None = None) -> list[str]:
    dash = dash or dashboard()
    return [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]


def test_grafana_dashboard():
    dash = dashboard()
    assert dash["schemaVersion"] >= 39 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, covered = set(), {}
    panels = [q for p in dash["panels"] for q in [p] + p.get("panels", [])]
    for p in panels:
        assert p["id"] not in ids, f"panel id {p['id']} twice"
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for row in range(g["y"], g["y"] + g["h"]):  # no two panels on the same cells
            for col in range(g["x"], g["x"] + g["w"]):
                assert (row, col) not in covered, f"{p['title']} overlaps {covered[(row, col)]}"
                covered[(row, col)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p.get("description"), f"{p['title']}: say what the panel shows"
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "streams", "agents", "devices", "hybrid", "listener", "access decisions",
                  "latency", "device proxy", "webhooks"):
        assert topic in titles, f"no panel about {topic}"
    for title, expr in dashboard_queries(dash):
        unknown = metric_names(expr) - exported()
        assert not unknown, f"panel {title!r} uses metrics relayd does not export: {unknown}"
        assert "$__rate_interval" in expr or "rate(" not in expr and "increase(" not in expr, title
    for q in template_queries(dash):
        assert not metric_names(q) - exported(), q


# -- compose.yaml (the container image's, issue 14 item 1) ----------------------------------


def test_compose_commands():
    """Each relayd command of compose.yaml parses with relayd's own
    command line, and every config file it names is one of configs/."""
    path = CONFIGS / "compose.yaml"
    doc = yaml.safe_load(path.read_text())
    seen = 0
    for name, svc in doc["services"].items():
        command = svc.get("command")
        if command is None:
            continue
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        if argv and argv[0].endswith("relayd"):
            argv = argv[1:]
        if not argv or argv[0] not in ("serve", "agent", "admin", "version"):
            continue
        cli.build_parser().parse_args(argv)
        seen += 1
    assert seen, "compose.yaml runs no relayd command"


# -- metric names -----------------------------------------------------------------------------

_METRIC = re.compile(r"\brelayd_[a-z0-9_]+")
_exported: set[str] = set()


def exported() -> set[str]:
    """Every sample name relayd's metric families can export (counters with
    _total, histograms with _bucket/_sum/_count)."""
    if not _exported:
        for mod in pkgutil.walk_packages(relayd.__path__, "relayd."):
            if not mod.name.endswith(("_c", "__main__")):
                importlib.import_module(mod.name)
        for fam in REGISTRY.collect():
            if not fam.name.startswith("relayd_"):
                continue
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                        "gauge": [""], "summary": ["_sum", "_count"]}.get(fam.type, [""])
            _exported.update(fam.name + s for s in suffixes)
    return _exported


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))
