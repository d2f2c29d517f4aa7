"""The catalog of hybrid connections: longest-prefix lookup without case,
options checked, the config's and the data directory's merged."""

import pytest

from relayd.control.hybrid import Catalog, HybridConnection
from relayd.control.sas import SasRule
from relayd.errors import ConfigError


def rule(name, rights=("send",)):
    return SasRule(name, f"key-of-{name}-0123456789", rights=frozenset(rights))


def test_the_longest_registered_prefix_of_whole_segments_wins():
    cat = Catalog.of([HybridConnection("a"), HybridConnection("a/b/c"), HybridConnection("Orders")])
    assert cat.find("a/b/c/d")[0].path == "a/b/c" and cat.find("a/b/c/d")[1] == "d"
    assert cat.find("A/B/C")[1] == ""
    assert cat.find("a/b/x") == (cat.connections["a"], "b/x")
    assert cat.find("orders/1")[0].path == "Orders"
    assert cat.find("ordersx") is None and cat.find("b") is None


def test_merging_the_config_and_the_data_directory():
    config = Catalog.of([HybridConnection("orders", requires_client_auth=False)], [rule("root")])
    stored = Catalog.of([HybridConnection("ORDERS"), HybridConnection("other")], [rule("root"), rule("cli")])
    cat = Catalog.merged(config, stored)
    assert cat.find("orders")[0].requires_client_auth is False  # the config's
    assert cat.find("other") is not None
    assert [r.name for r in cat.rules] == ["root", "cli"]
    with pytest.raises(ConfigError, match="at most 12"):
        Catalog.merged(Catalog.of([], [rule(f"c{i}") for i in range(7)]),
                       Catalog.of([], [rule(f"s{i}") for i in range(6)]))


@pytest.mark.parametrize("kw", [dict(path=""), dict(path="a//b"), dict(path="$hc"), dict(path=".relayd/x"),
                                dict(path="x" * 261), dict(path="a b"), dict(path="ok", response_timeout=0),
                                dict(path="ok", control_threshold=70000), dict(path="ok", max_listeners=0),
                                dict(path="ok", rules=(rule("r"), rule("r")))])
def test_bad_hybrid_connections_are_refused(kw):
    with pytest.raises(ConfigError):
        HybridConnection(**kw)
