"""Section 10 of the zero-trust spec against the controller's one token
check (the gateway calls the same): forgery, expiry, replay on another
client, DN tricks, wrong site or session, rollback, device-claim limits.
Each refusal has its reason label and counts in
relayd_token_rejections_total."""

import base64
import hashlib
import hmac
import json
import secrets
import time

import pyotp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from relayd.client.zerotrust import new_key_and_csr
from relayd.control import jws
from relayd.control.ca import CertificateAuthority
from relayd.control.policy import Policy
from relayd.control.store import Store
from relayd.control.zerotrust import Controller, Refused, ZtConfig
from relayd.control.ztstore import ZtStore
from tests.metric import value
from tests.zerotrust.stack import PASSWORD, policy_doc


@pytest.fixture
def ctl(tmp_path):
    store = Store(tmp_path / "relayd.db")
    zs = ZtStore(store)
    c = Controller(tmp_path, zs, ZtConfig(site="s-lab"))
    zs.import_policy(Policy.from_doc(policy_doc()))
    c.secret = c.add_user("alice", PASSWORD, groups=["staff"], with_totp=True)
    c.add_user("mallory", PASSWORD, groups=["staff"])
    yield c
    store.close()


def sign_in(c, user="alice", device=None):
    key, csr = new_key_and_csr()
    body = {"provider": "local", "username": user, "password": PASSWORD, "device_id": device or secrets.token_hex(16),
            "csr": csr, "device_claims": {}}
    if user == "alice":  # one sign-in of alice per test: one TOTP step each
        # the previous step's code (a step-up later in the test takes the current one); not in the
        # last seconds of a step, when a boundary passing before the check would leave it outside the window
        if time.time() % 30 > 24:
            time.sleep(30.5 - time.time() % 30)
        body["otp"] = pyotp.TOTP(c.secret).at(time.time() - 30)
    r = c.login(body, "127.0.0.1")
    der = x509.load_pem_x509_certificate(r["certificate"].encode()).public_bytes(serialization.Encoding.DER)
    return r, der



def refused(c, reason, token, typ=jws.CLAIMS, der=b"", **kw):
    before = value("relayd_token_rejections_total", reason=reason)
    with pytest.raises(Refused) as e:
        c.check_token(token, typ, der, **kw)
    assert e.value.reason == reason, str(e.value)
    assert value("relayd_token_rejections_total", reason=reason) == before + 1


def b64(d: bytes) -> str:
    return base64.urlsafe_b64encode(d).decode().rstrip("=")


def forge(header: dict, payload: dict, key=None) -> str:
    h, p = b64(json.dumps(header).encode()), b64(json.dumps(payload).encode())
    sig = key.sign(f"{h}.{p}".encode()) if key else b""
    return f"{h}.{p}.{b64(sig)}"


def test_valid_tokens_pass_and_forgeries_fail(ctl):
    r, der = sign_in(ctl)
    p = ctl.check_token(r["claims_token"], jws.CLAIMS, der)
    assert p["user"]["username"] == "alice" and p["_triple"][1] == "alice"
    h, pl, s = r["claims_token"].split(".")
    payload = json.loads(base64.urlsafe_b64decode(pl + "=="))
    kid = ctl.kid
    refused(ctl, "alg", forge({"alg": "none", "typ": jws.CLAIMS, "kid": kid}, payload), der=der)
    pub = ctl.signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    hh, pp = b64(json.dumps({"alg": "HS256", "typ": jws.CLAIMS, "kid": kid}).encode()), pl
    hs = f"{hh}.{pp}.{b64(hmac.new(pub, f'{hh}.{pp}'.encode(), hashlib.sha256).digest())}"
    refused(ctl, "alg", hs, der=der)
    other = Ed25519PrivateKey.generate()
    refused(ctl, "kid", forge({"alg": "EdDSA", "typ": jws.CLAIMS, "kid": jws.key_id(other.public_key())}, payload,
                              other), der=der)
    refused(ctl, "signature", forge({"alg": "EdDSA", "typ": jws.CLAIMS, "kid": kid}, payload, other), der=der)
    refused(ctl, "bad_header", forge({"alg": "EdDSA", "typ": jws.CLAIMS, "kid": kid, "jku": "http://x"}, payload,
                                 ctl.signing), der=der)
    tampered = dict(payload, user=dict(payload["user"], groups=["admin"]))
    refused(ctl, "signature", f"{h}.{b64(json.dumps(tampered).encode())}.{s}", der=der)
    refused(ctl, "malformed", f"{h}.{pl}=.{s}", der=der)
    refused(ctl, "typ", r["claims_token"], jws.ENTITLEMENTS, der, site="s-lab")  # claims as entitlements
    refused(ctl, "too_large", "a" * 20000, der=der)
    for bad in ({**payload, "exp": str(payload["exp"])}, {**payload, "exp": payload["exp"] + 0.5},
                {k: v for k, v in payload.items() if k != "exp"}):
        refused(ctl, jws_reason(bad), jws.sign(bad, jws.CLAIMS, ctl.signing), der=der)


def jws_reason(p):
    return "time" if "exp" not in p else "json"


def test_expiry_and_windows(ctl):
    r, der = sign_in(ctl)
    p = ctl.check_token(r["claims_token"], jws.CLAIMS, der)
    refused(ctl, "expired", r["claims_token"], der=der, now=p["exp"] + 31)
    refused(ctl, "certificate_expired", r["claims_token"], der=der, now=p["exp"] + 200)
    future = dict({k: v for k, v in p.items() if k != "_triple"}, nbf=int(time.time()) + 3600)
    refused(ctl, "not_yet_valid", jws.sign(future, jws.CLAIMS, ctl.signing), der=der)


def test_replay_on_another_client_and_dn_tricks(ctl):
    r1, der1 = sign_in(ctl)
    r2, der2 = sign_in(ctl, "mallory")
    refused(ctl, "dn_mismatch", r1["claims_token"], der=der2)  # a stolen token, another device's certificate
    # an agent certificate where a user certificate belongs
    agent_ca = CertificateAuthority.load_or_create(ctl.user_ca.directory.parent / "agent-ca")
    _, csr = new_key_and_csr()
    agent_cert = agent_ca.sign_agent_csr(csr.encode(), "ag-1", days=1)
    refused(ctl, "wrong_ca", r1["claims_token"], der=x509.load_pem_x509_certificate(agent_cert).public_bytes(
        serialization.Encoding.DER))
    refused(ctl, "no_certificate", r1["claims_token"], der=b"")
    for name in ("a,CN=admin", "Alice", "al ice", "a\x00b", "x" * 65, "ålice"):
        with pytest.raises(Refused) as e:
            key, csr = new_key_and_csr()
            ctl.login({"provider": "local", "username": name, "password": PASSWORD,
                       "device_id": secrets.token_hex(16), "csr": csr}, "127.0.0.1")
        assert e.value.reason == "bad_credentials"
    for dev in ("A" * 32, "0" * 31, "g" * 32, "../" + "0" * 29):
        key, csr = new_key_and_csr()
        with pytest.raises(Refused) as e:
            ctl.login({"provider": "local", "username": "mallory", "password": PASSWORD, "device_id": dev,
                       "csr": csr}, "127.0.0.1")
        assert e.value.reason == "bad_device_id"


def test_same_dn_other_key_is_cnf_mismatch(ctl):
    r1, der1 = sign_in(ctl, "mallory")
    p = json.loads(base64.urlsafe_b64decode(r1["claims_token"].split(".")[1] + "=="))
    # a second certificate for the same DN (a new sign-in of the same device)
    key, csr = new_key_and_csr()
    r2 = ctl.login({"provider": "local", "username": "mallory", "password": PASSWORD, "device_id": p["device"]["id"],
                    "csr": csr, "onboarding_secret": r1["onboarding_secret"]}, "127.0.0.1")
    der2 = x509.load_pem_x509_certificate(r2["certificate"].encode()).public_bytes(serialization.Encoding.DER)
    refused(ctl, "cnf_mismatch", r1["claims_token"], der=der2)
    # and without the on-boarding secret, the device cannot be claimed again
    with pytest.raises(Refused):
        ctl.login({"provider": "local", "username": "mallory", "password": PASSWORD, "device_id": p["device"]["id"],
                   "csr": new_key_and_csr()[1]}, "127.0.0.1")


def test_wrong_site_session_mix_and_revoked(ctl):
    r, der = sign_in(ctl, "mallory")
    ents = ctl.entitlements(r["claims_token"], der)["entitlement_tokens"]
    ctl.check_token(ents["s-lab"], jws.ENTITLEMENTS, der, site="s-lab")
    refused(ctl, "wrong_site", ents["s-lab"], jws.ENTITLEMENTS, der, site="s-other")
    ctl.revoke("kill", {"user": ["local", "mallory"]}, reason="test")
    refused(ctl, "revoked", r["claims_token"], der=der)
    refused(ctl, "revoked", ents["s-lab"], jws.ENTITLEMENTS, der, site="s-lab")


def test_stepup_rules(ctl):
    r, der = sign_in(ctl)
    totp = pyotp.TOTP(ctl.secret)
    # a step-up nobody asks for, or through another provider under the same suffix
    for body in ({"method": "otp", "suffix": "other", "provider": "totp", "credential": totp.now()},
                 {"method": "password", "suffix": "lab", "provider": "local", "credential": PASSWORD}):
        with pytest.raises(Refused) as e:
            ctl.stepup(r["claims_token"], der, body)
        assert e.value.reason == "stepup_not_offered"
    code = totp.now()
    out = ctl.stepup(r["claims_token"], der, {"method": "otp", "suffix": "lab", "provider": "totp",
                                               "credential": code})
    p = ctl.check_token(out["claims_token"], jws.CLAIMS, der)
    assert "otp:lab" in p["stepup"] and p["exp"] == ctl.check_token(r["claims_token"], jws.CLAIMS, der)["exp"]
    with pytest.raises(Refused) as e:  # the same code twice
        ctl.stepup(r["claims_token"], der, {"method": "otp", "suffix": "lab", "provider": "totp", "credential": code})
    assert e.value.reason == "bad_otp"


def test_device_claims_limits(ctl):
    from relayd.control.zerotrust import device_claims

    for bad in ({"x": "y" * 9000}, {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}, ["not", "an", "object"]):
        with pytest.raises(Refused):
            device_claims(bad)
    from relayd.control.policy import condition_passes

    cond = {"logic": "all", "criteria": [{"claim": "device.av", "op": "eq", "value": True}]}
    assert not condition_passes(cond, {"device": {"av": "true"}})  # a string never equals a boolean
    assert not condition_passes(cond, {"device": {}})  # missing: UNKNOWN, false at the top
    assert not condition_passes({"logic": "all", "criteria": [{"not": cond["criteria"][0]}]}, {"device": {}})
    assert condition_passes(cond, {"device": {"av": True}})


def test_password_guessing_is_refused_after_ten_wrong_ones(ctl):
    def attempt(user, password):
        key, csr = new_key_and_csr()
        return ctl.login({"provider": "local", "username": user, "password": password,
                          "device_id": secrets.token_hex(16), "csr": csr, "device_claims": {}}, "127.0.0.1")

    for i in range(10):
        with pytest.raises(Refused) as e:
            attempt("mallory", f"guess number {i}")
        assert e.value.reason == "bad_credentials"
    before = value("relayd_token_rejections_total", reason="too_many_attempts")
    with pytest.raises(Refused) as e:  # the right password too, for the rest of the window
        attempt("mallory", PASSWORD)
    assert e.value.reason == "too_many_attempts" and e.value.status == 429
    assert value("relayd_token_rejections_total", reason="too_many_attempts") == before + 1
    # Another user is not affected; an unknown user name has no budget to spend.
    ctl.add_user("trent", PASSWORD, groups=["staff"])
    assert attempt("trent", PASSWORD)["claims_token"]
    for _ in range(12):
        with pytest.raises(Refused) as e:
            attempt("nobody", "whatever it is")
        assert e.value.reason == "bad_credentials"
