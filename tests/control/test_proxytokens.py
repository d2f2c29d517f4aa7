"""Proxy tokens (relayd.control.deviceproxy.ProxyTokens): a token checked
once is not checked again by signature, but its times and issuer are, at
every use."""

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd.control import deviceproxy, jws


def test_a_checked_token_still_expires_and_still_names_its_issuer(monkeypatch):
    issuer = ["https://relay.test:8443"]
    tokens = deviceproxy.ProxyTokens(Ed25519PrivateKey.generate(), lambda: issuer[0])
    token = tokens.issue("usr_1", {"dv-1": "viewer"}, now=1_000_000)
    assert tokens.verify(token, now=1_000_010) == ("usr_1", {"dv-1": "viewer"})
    calls = []
    real = jws.verify
    monkeypatch.setattr(jws, "verify", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert tokens.verify(token, now=1_000_020)[0] == "usr_1" and not calls  # not checked again
    with pytest.raises(jws.TokenError) as e:
        tokens.verify(token, now=1_000_000 + deviceproxy.TOKEN_TTL + 1)
    assert e.value.reason == "expired"
    issuer[0] = "https://elsewhere.test"
    with pytest.raises(jws.TokenError) as e:
        tokens.verify(token, now=1_000_020)
    assert e.value.reason == "issuer"
    # a forged token is refused every time, never kept
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(jws.TokenError):
            tokens.verify(forged, now=1_000_020)
    assert forged not in tokens._checked and len(calls) == 2


def test_the_table_of_checked_tokens_is_bounded(monkeypatch):
    monkeypatch.setattr(deviceproxy, "CHECKED_TOKENS", 8)
    tokens = deviceproxy.ProxyTokens(Ed25519PrivateKey.generate(), lambda: "https://relay.test")
    for i in range(20):
        tokens.verify(tokens.issue(f"usr_{i}", {}, now=1_000_000), now=1_000_001)
        assert len(tokens._checked) <= 8
