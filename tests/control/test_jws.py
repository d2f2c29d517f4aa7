"""relayd's own tokens: compact JWS with Ed25519, read strictly, each
refusal with the reason the gateway counts (../shared/specs/zero-trust.md
section 4.3)."""

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd.control import jws

KEY = Ed25519PrivateKey.generate()
KEYS = {jws.key_id(KEY.public_key()): KEY.public_key()}
NOW = 1_732_350_000
CLAIMS = {"iss": "relayd:ctl:7c0866a6", "sub": "CN=dev,CN=alice,OU=corp", "aud": ["relayd:gateway"], "tt": "claims",
          "iat": NOW, "nbf": NOW - 60, "exp": NOW + 3600, "user": {"username": "alice", "groups": ["dba"]}}


def b64(obj) -> str:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header, payload, key=KEY) -> str:
    h, p = b64(header), b64(payload)
    return f"{h}.{p}.{b64(key.sign(f'{h}.{p}'.encode()))}"


def header(**kw):
    return {"alg": "EdDSA", "typ": jws.CLAIMS, "kid": jws.key_id(KEY.public_key()), **kw}


def reason(token, typ=jws.CLAIMS, keys=KEYS):
    with pytest.raises(jws.TokenError) as exc:
        jws.verify(token, typ, keys)
    return exc.value.reason


def test_sign_and_verify_and_the_key_id():
    tok = jws.sign(CLAIMS, jws.CLAIMS, KEY)
    assert jws.verify(tok, jws.CLAIMS, KEYS) == CLAIMS
    assert len(jws.key_id(KEY.public_key())) == 16 and "=" not in tok
    jws.check_window(CLAIMS, NOW)


def test_every_refusal_has_its_reason():
    good = jws.sign(CLAIMS, jws.CLAIMS, KEY)
    h, p, s = good.split(".")
    other = Ed25519PrivateKey.generate()
    assert reason("x" * 20000) == "too_large"
    assert reason(h + "." + p) == "malformed"
    assert reason(f"{h}.{p}.{s}=") == "malformed"  # padding
    assert reason(f"{h}.{p[:-1]}+.{s}") == "malformed"  # '+' is base64, not base64url
    assert reason(forged({**header(), "jku": "http://evil"}, CLAIMS)) == "bad_header"
    assert reason(forged(header(alg="none"), CLAIMS)) == "alg"
    assert reason(forged(header(alg="HS256"), CLAIMS)) == "alg"
    assert reason(good, typ=jws.ENTITLEMENTS) == "typ"
    assert reason(forged(header(kid="unknown-kid-1234"), CLAIMS)) == "kid"
    assert reason(forged(header(), CLAIMS, key=other)) == "signature"
    assert reason(f"{h}.{b64({**CLAIMS, 'exp': NOW + 99999})}.{s}") == "signature"  # a changed payload
    assert reason(forged(header(), b'{"a": 1, "a": 2}')) == "json"  # duplicate keys
    deep = {"a": 1}
    for _ in range(9):
        deep = {"x": deep}
    assert reason(forged(header(), deep)) == "json"
    assert reason(forged(header(), {**CLAIMS, "exp": 1.5e9})) == "json"  # times are integers
    assert reason(forged(header(), {**CLAIMS, "iat": True})) == "json"
    assert reason(forged(header(), [1, 2])) == "json"
    assert reason(forged(header(), b"\xff\xfe")) == "json"
    assert reason(forged(header(), b'{"a": NaN}')) == "json"


def test_the_time_window():
    jws.check_window(CLAIMS, NOW - 60 - 60)  # nbf - 60
    with pytest.raises(jws.TokenError) as exc:
        jws.check_window(CLAIMS, NOW - 60 - 61)
    assert exc.value.reason == "not_yet_valid"
    jws.check_window(CLAIMS, NOW + 3600 + 29)
    with pytest.raises(jws.TokenError) as exc:
        jws.check_window(CLAIMS, NOW + 3600 + 30)
    assert exc.value.reason == "expired"


def test_an_entitlement_token_over_its_cap_fails_loudly_at_issue():
    with pytest.raises(ValueError, match="over the"):
        jws.sign({"entitlements": ["x" * 300_000]}, jws.ENTITLEMENTS, KEY)
