"""Forward-proxy settings of the agent's dial-out (relayd.net.proxy): the
proxy URL and the environment (HTTPS_PROXY, NO_PROXY). A real proxy in
the path: tests/tunnel/test_proxy.py."""

import pytest

from relayd.errors import ConfigError
from relayd.net.proxy import parse_proxy_url, proxy_from_env


def test_proxy_from_environment_and_no_proxy():
    env = {"HTTPS_PROXY": "http://u:p@proxy.internal:3128", "NO_PROXY": "localhost,.corp.example,10.0.0.0/8"}
    p = proxy_from_env("relay.example.com", env)
    assert (p.host, p.port, p.username, p.password) == ("proxy.internal", 3128, "u", "p")
    assert "p@" not in repr(p) and "u:" not in repr(p)
    assert proxy_from_env("localhost", env) is None
    assert proxy_from_env("relay.corp.example", env) is None
    assert proxy_from_env("10.1.2.3", env) is None
    assert proxy_from_env("relay.example.com", {}) is None


@pytest.mark.parametrize("url", ["socks5://h:1", "https://h:1", "http://", "http://h:notaport"])
def test_bad_proxy_url(url):
    with pytest.raises(ConfigError, match="proxy"):
        parse_proxy_url(url)
