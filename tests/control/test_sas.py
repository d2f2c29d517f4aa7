"""SAS tokens made and checked as Azure Relay does, with the vectors of
../shared/specs/hybrid-connections.md section 3 (cross-checked there against
hyco-ws 1.0.5's createRelayToken), and every way a token is refused."""

import pytest

from relayd.control import sas
from relayd.errors import ConfigError

KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
RULE = sas.SasRule("RootManageSharedAccessKey", KEY, rights=frozenset({"listen", "send", "manage"}))
NS = {"contoso.servicebus.windows.net"}
SE = 1700000000
NOW = SE - 100


def token(sr, sig, se=SE, skn="RootManageSharedAccessKey"):
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}"


def test_the_worked_example_byte_for_byte():
    t = sas.make_token("http://contoso.servicebus.windows.net/hyco", "RootManageSharedAccessKey", KEY, SE)
    assert t == ("SharedAccessSignature sr=http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco"
                 "&sig=gKTynw%2BF2bqVzo%2BCz1CD7MktdB8i7h7ju6iFBXwnEEg%3D&se=1700000000&skn=RootManageSharedAccessKey")
    assert sas.check(t, [RULE], NS, "hyco", "listen", NOW).expiry == SE


@pytest.mark.parametrize("sr, sig", [
    ("http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco", "gKTynw+F2bqVzo+Cz1CD7MktdB8i7h7ju6iFBXwnEEg="),
    ("http%3A%2F%2Fcontoso.servicebus.windows.net%2Fhyco%2F", "sPCtCmn3D5R3PkH9ThceyuLjcS8t7S3QlN62AYUoIjo="),
    ("http%3A%2F%2Fcontoso.servicebus.windows.net%3A443%2Fhyco", "yzhJC+tx1ZFctZc9FPet+skLuKtQ8h5DMT0+O+U+MyM="),
    ("http%3a%2f%2fcontoso.servicebus.windows.net%2fhyco%2f", "FhuW2kw65o8lrISraK4YKg6ADm1joTPVQs0O0s9gtnI="),
])
def test_every_clients_encoding_verifies_and_scopes_to_the_entity(sr, sig):
    from urllib.parse import quote

    for encoded in (quote(sig, safe=""), quote(sig, safe="/"), sig.replace("+", " ")):  # how clients send sig
        tok = sas.check(token(sr, encoded), [RULE], NS, "hyco", "send", NOW)
        assert tok.scope == ("contoso.servicebus.windows.net", "hyco")
    assert sas.check(token(sr, quote(sig, safe="")), [RULE], NS, "hyco/sub/path", "send", NOW)


def refused(text, path="hyco", right="listen", rules=(RULE,), now=NOW, skew=300.0):
    with pytest.raises(sas.SasError) as exc:
        sas.check(text, list(rules), NS, path, right, now, skew)
    return exc.value


def good(resource="http://contoso.servicebus.windows.net/hyco", rule=RULE, key=KEY, se=SE):
    return sas.make_token(resource, rule.name, key, se)


def test_missing_and_malformed_tokens_are_401():
    assert (refused("").status, refused("").code) == (401, "MissingToken")
    for bad in ("Bearer abc", "SharedAccessSignature", "SharedAccessSignature sr=a&sig=b",
                "SharedAccessSignature sr=a&sig=b&se=soon&skn=x", "SharedAccessSignature sr=a&sr=a&sig=b&se=1&skn=x",
                "SharedAccessSignature nonsense", 42, "x" * 5000):
        e = refused(bad)
        assert (e.status, e.code) == (401, "MalformedToken"), bad


def test_a_wrong_key_an_unknown_rule_and_a_changed_field_are_invalid_signatures():
    wrong = sas.make_token("http://contoso.servicebus.windows.net/hyco", RULE.name, "another-key-of-some-length", SE)
    unknown = sas.make_token("http://contoso.servicebus.windows.net/hyco", "Nobody", KEY, SE)
    longer = good().replace(f"se={SE}", f"se={SE + 3600}")
    other = good().replace("%2Fhyco", "%2Fhycx")
    for bad in (wrong, unknown, longer, other):
        e = refused(bad)
        assert (e.status, e.code) == (401, "InvalidSignature") and "token has an invalid signature" in str(e)
        assert "sig=" not in str(e) and KEY not in str(e)


def test_expiry_with_the_clock_skew():
    assert sas.check(good(), [RULE], NS, "hyco", "listen", SE + 299)  # renewed at the expiry: skew
    e = refused(good(), now=SE + 301)
    assert (e.status, e.code) == (401, "ExpiredToken") and "2023-11-14T22:13:20Z" in str(e)
    assert refused(good(), now=SE + 1, skew=0).code == "ExpiredToken"


def test_another_resource_or_namespace_is_403():
    for resource, path in (("http://contoso.servicebus.windows.net/other", "hyco"),
                           ("http://contoso.servicebus.windows.net/hyco", "hycoextra"),  # not at a / boundary
                           ("http://contoso.servicebus.windows.net/hyco/sub", "hyco"),  # narrower than the entity
                           ("http://elsewhere.example/hyco", "hyco")):
        e = refused(good(resource), path=path)
        assert (e.status, e.code) == (403, "InvalidAudience"), resource
    # The namespace itself, any scheme, port, case and a $hc prefix: valid for everything in it.
    for resource in ("sb://CONTOSO.servicebus.windows.net/", "https://contoso.servicebus.windows.net:8443/$hc/hyco",
                     "http://contoso.servicebus.windows.net/HYCO/"):
        assert sas.check(good(resource), [RULE], NS, "hyco", "listen", NOW)


def test_rights():
    send_only = sas.SasRule("sender", "a-send-only-key-1234", rights=frozenset({"send"}))
    t = good(rule=send_only, key=send_only.primary_key)
    assert sas.check(t, [send_only], NS, "hyco", "send", NOW)
    e = refused(t, rules=(send_only,), right="listen")
    assert (e.status, e.code) == (403, "Unauthorized") and "'Listen' claim(s) are required" in str(e)
    manage = sas.SasRule("m", "a-manage-only-key-123", rights=frozenset({"manage"}))
    assert sas.check(good(rule=manage, key=manage.primary_key), [manage], NS, "hyco", "listen", NOW)


def test_a_rotated_key_still_verifies_as_the_secondary_until_rotated_again():
    old = RULE
    new = sas.SasRule(old.name, sas.new_key(), old.primary_key, old.rights)
    t_old = good()
    t_new = good(rule=new, key=new.primary_key)
    assert sas.check(t_old, [new], NS, "hyco", "listen", NOW) and sas.check(t_new, [new], NS, "hyco", "listen", NOW)
    newer = sas.SasRule(old.name, sas.new_key(), new.primary_key, old.rights)
    assert refused(t_old, rules=(newer,)).code == "InvalidSignature"


def test_rules_and_rights_are_checked_when_made():
    assert len(sas.new_key()) == 44
    assert sas.parse_rights("Listen, send") == {"listen", "send"}
    for bad in (lambda: sas.SasRule("bad name", KEY), lambda: sas.SasRule("n", "short"),
                lambda: sas.SasRule("n", KEY, rights=frozenset({"admin"})), lambda: sas.parse_rights("all"),
                lambda: sas.parse_rights([])):
        with pytest.raises(ConfigError):
            bad()


def test_connection_strings_as_the_portal_writes_them():
    text = ("Endpoint=sb://relay.example.com/;SharedAccessKeyName=RootManageSharedAccessKey;"
            f"SharedAccessKey={KEY};EntityPath=orders")
    cs = sas.parse_connection_string(text)
    assert (cs.host, cs.port, cs.key_name, cs.key, cs.entity_path) == (
        "relay.example.com", 443, "RootManageSharedAccessKey", KEY, "orders")
    assert str(cs) == text
    assert sas.parse_connection_string("endpoint=sb://h:8443/;sharedaccesssignature=SharedAccessSignature x;"
                                       "OperationTimeout=00:01:00").port == 8443
    for bad in (f"Endpoint=https://h/;SharedAccessKeyName=a;SharedAccessKey={KEY}", "Endpoint=sb://h/",
                f"Endpoint=sb://h/;SharedAccessKey={KEY};Password=x"):
        with pytest.raises(ConfigError) as exc:
            sas.parse_connection_string(bad)
        assert KEY not in str(exc.value)  # never quotes the key
