"""relayd's config: the one duration parser and the one host:port parser
(flags, TOML, join-token addresses), strict, with errors that name the key;
the TOML file carrying what the flags carry."""

import pytest

from relayd.config import ServeConfig, load_agent, load_serve, parse_duration, parse_hostport
from relayd.errors import ConfigError


@pytest.mark.parametrize(
    "text, seconds",
    [("30s", 30), ("15m", 900), ("2h", 7200), ("7d", 604800), ("1h30m", 5400),
     ("90", 90), ("1.5", 1.5), ("0.5h", 1800), (" 10m ", 600), ("500ms", 0.5),
     ("1d2h3m4s", 93784), ("0s", 0), (0, 0), (2.5, 2.5)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "-5m", "5x", "m", "1h 30m", "h1", "inf", "nan", "1e3", "1_000",
             "5M", "1.h", None, True, -1, float("inf")]
)
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="config key 'serve.grace'"):
        parse_duration(text, "serve.grace")


@pytest.mark.parametrize(
    "text, expected",
    [("example.com:443", ("example.com", 443)), ("127.0.0.1:0", ("127.0.0.1", 0)),
     ("[::1]:8443", ("::1", 8443)), ("localhost:65535", ("localhost", 65535)),
     (":7000", ("0.0.0.0", 7000))],
)
def test_parse_hostport(text, expected):
    assert parse_hostport(text, "serve.agents") == expected


@pytest.mark.parametrize(
    "text", ["", "example.com", "example.com:", "example.com:http", "h:65536",
             "h:-1", "::1:443", "[::1]", "[::1]443", "[nope]:443", "[::1:443", "a b:1",
             "h:+1", "h: 1", "é.com:1", "a..b:1", None]
)
def test_parse_hostport_rejects(text):
    with pytest.raises(ConfigError, match="config key 'serve.agents'"):
        parse_hostport(text, "serve.agents")


def test_an_address_to_dial_needs_a_host():
    with pytest.raises(ConfigError, match="names no host"):
        parse_hostport(":443", "join token address", need_host=True)


def test_drain_has_a_key_in_both_configs(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[serve]\ndrain = "30s"\n[agent]\ndrain = "2m"\n')
    assert load_serve(f).drain == 30 and load_agent(f).drain == 120
    assert load_serve(None).drain == 10  # the default


def test_http_limits_have_a_table_and_are_checked_at_start(tmp_path):
    from relayd.core import http1

    f = tmp_path / "relay.toml"
    f.write_text('[http]\nmax_head = 4096\nmax_queued_requests = 2\nidle_timeout = "5s"\n')
    lim = load_serve(f).http_limits
    assert (lim.max_head, lim.max_queued_requests, lim.idle_timeout) == (4096, 2, 5.0)
    assert lim.max_headers == http1.LIMITS.max_headers  # the rest keep their defaults
    assert load_serve(None).http_limits == http1.LIMITS
    for bad, key in (('max_head = 10', "http.max_head"), ('idle_timeout = "0s"', "http.idle_timeout"),
                     ('max_head = "big"', "http.max_head"), ('nonsense = 1', "nonsense")):
        f.write_text(f"[http]\n{bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_serve(f)


def test_websocket_limits_have_a_table_in_both_configs(tmp_path):
    from relayd.core.wsconfig import AGENT_LINK

    f = tmp_path / "c.toml"
    f.write_text('[websocket]\nmax_message = 65536\nclose_timeout = "3s"\n')
    for cfg in (load_serve(f), load_agent(f)):
        ws = cfg.websocket
        assert (ws.max_message, ws.close_timeout) == (65536, 3.0)
        assert ws.max_frame == AGENT_LINK.max_frame  # the rest keep the agent link's values
    assert load_serve(None).websocket == load_agent(None).websocket == AGENT_LINK
    for bad, key in (('max_frame = 10', "websocket.max_frame"), ('close_timeout = "0s"', "websocket.close_timeout"),
                     ('max_buffered = "big"', "websocket.max_buffered"), ('nonsense = 1', "nonsense")):
        f.write_text(f"[websocket]\n{bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_serve(f)


def test_splice_limits_and_the_preamble_timeout_have_keys(tmp_path):
    from relayd.core.config import SPLICE

    f = tmp_path / "c.toml"
    f.write_text('[splice]\nmax_held = 4096\n[admission]\npreamble_timeout = "3s"\n')
    cfg = load_serve(f)
    assert (cfg.splice.max_held, cfg.splice.max_pending, cfg.admission.preamble_timeout) == (4096, SPLICE.max_pending, 3)
    assert load_agent(f).splice.max_held == 4096
    for bad, key in (('[splice]\nmax_held = 10', "splice.max_held"),
                     ('[splice]\nmax_pending = 1024', "splice.max_pending"),
                     ('[admission]\npreamble_timeout = "0s"', "admission.preamble_timeout")):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=key):
            load_serve(f)


def test_config_file_carries_what_flags_carry(tmp_path):
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(
        "[serve]\ndata = 'r'\nagents = '127.0.0.1:7100'\npublic = 'relay.example:443'\nhostname = 'relay.example'\n"
        "metrics = '127.0.0.1:9100'\ngrace = '2s'\nagent_cert_ttl = '7d'\n[serve.tcp]\nweb = ':8080'\n"
        "[agent]\ndata = 'a'\njoin = 'relayd1.x'\nreconnect_max = '10s'\n[agent.endpoints]\nweb = '127.0.0.1:80'\n"
        "[mux]\nmax_window = 8388608\nping_interval = '5s'\n[log]\nlevel = 'debug'\n")
    s = load_serve(cfg).validate()
    assert s.agents == ("127.0.0.1", 7100) and s.public == ("relay.example", 443) and s.grace == 2.0
    assert s.tcp == {"web": ("0.0.0.0", 8080)} and s.agent_cert_ttl == 7 * 86400 and s.mux.max_window == 8388608
    assert s.advertised == ("relay.example", 443) and s.log_level == "debug" and s.metrics == ("127.0.0.1", 9100)
    a = load_agent(cfg).validate()
    assert a.endpoints == {"web": ("127.0.0.1", 80)} and a.reconnect_max == 10 and a.mux.ping_interval == 5


def test_certs_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="serve.https"):
        ServeConfig(certs=[(tmp_path / "a", tmp_path / "b")]).validate()
    cfg = tmp_path / "r.toml"
    cfg.write_text("[serve]\nhttps = '127.0.0.1:0'\n[[serve.certs]]\ncert = '/nonexistent.pem'\nkey = '/x.key'\n")
    with pytest.raises(ConfigError, match=r"serve\.certs\[0\]\.cert"):
        load_serve(cfg).validate()
    cfg.write_text("[serve]\nhttps = '127.0.0.1:0'\n[[serve.certs]]\ncert = 'a'\n")
    with pytest.raises(ConfigError, match="needs cert and key"):
        load_serve(cfg)


def test_agent_connect_timeout_is_a_setting(tmp_path):
    from relayd.config import load_agent

    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nconnect_timeout = "3s"\n')
    assert load_agent(f).connect_timeout == 3.0
    assert load_agent(None).connect_timeout == 10.0
    f.write_text('[agent]\nconnect_timeout = "0s"\n')
    with pytest.raises(ConfigError, match="agent.connect_timeout"):
        load_agent(f).validate()


def test_mux_window_idle_takes_a_duration(tmp_path):
    f = tmp_path / "relay.toml"
    f.write_text('[mux]\nwindow_idle = "2s"\n')
    assert load_serve(f).mux.window_idle == 2.0


HYBRID = '''
[hybrid]
clock_skew = "2m"
[[hybrid.rules]]
name = "RootManageSharedAccessKey"
key = "c2VjcmV0LWtleS1vZi10aGUtbm9kZQ=="
rights = ["listen", "send", "manage"]
[[hybrid.connections]]
path = "orders"
requires_client_auth = true
rules = [{ name = "orders-listen", key = "b3JkZXJzLWxpc3Rlbi1rZXk=", rights = ["listen"] }]
[[hybrid.connections]]
path = "a/b/c"
requires_client_auth = false
websocket = false
response_timeout = "5m"
control_threshold = 4096
'''


def test_hybrid_connections_and_rules_from_the_config(tmp_path):
    f = tmp_path / "relay.toml"
    f.write_text(HYBRID)
    cfg = load_serve(f)
    cat = cfg.hybrid
    assert cfg.hybrid_clock_skew == 120
    assert [r.name for r in cat.rules] == ["RootManageSharedAccessKey"]
    hc, suffix = cat.find("ORDERS/17/lines")
    assert (hc.path, suffix, hc.requires_client_auth, hc.websocket, hc.http) == ("orders", "17/lines", True, True, True)
    assert [r.name for r in cat.rules_for(hc)] == ["RootManageSharedAccessKey", "orders-listen"]
    abc, rest = cat.find("a/b/c")
    assert (abc.requires_client_auth, abc.websocket, abc.response_timeout, abc.control_threshold, rest) == (
        False, False, 300, 4096, "")
    assert cat.find("a/b") is None and cat.find("ordersx") is None
    assert load_serve(None).hybrid.connections == {}


@pytest.mark.parametrize("bad, key", [
    ('[[hybrid.connections]]\npath = "x"\n[[hybrid.connections]]\npath = "X"\n', "defined twice"),
    ('[[hybrid.connections]]\npath = "a//b"\n', "hybrid.connections\\[0\\]"),
    ('[[hybrid.connections]]\npath = "$hc/x"\n', "hybrid.connections\\[0\\]"),
    ('[[hybrid.connections]]\npath = "x"\nhttp = "yes"\n', "hybrid.connections\\[0\\].http"),
    ('[[hybrid.connections]]\npath = "x"\ncontrol_threshold = 100000\n', "control_threshold"),
    ('[[hybrid.rules]]\nname = "n"\nkey = "short"\nrights = ["listen"]\n', "hybrid.rules\\[0\\]"),
    ('[[hybrid.rules]]\nname = "n"\nkey = "a-long-enough-key-1"\nrights = ["root"]\n', "hybrid.rules\\[0\\]"),
    ('[[hybrid.rules]]\nname = "n"\nkey = "a-long-enough-key-1"\n', "needs name, key and rights"),
    ('[hybrid]\nclock_skew = "2h"\n', "hybrid.clock_skew"),
    ('[hybrid]\nnonsense = 1\n', "hybrid.nonsense"),
    ("".join(f'[[hybrid.rules]]\nname = "n{i}"\nkey = "a-long-enough-key-1"\nrights = ["send"]\n' for i in range(13)),
     "at most 12"),
])
def test_bad_hybrid_config_is_refused_naming_the_key(tmp_path, bad, key):
    f = tmp_path / "relay.toml"
    f.write_text(bad)
    with pytest.raises(ConfigError, match=key):
        load_serve(f)
