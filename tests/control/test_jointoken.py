"""Join tokens: round trip, strict decoding, secrets kept out of text."""

from __future__ import annotations

import base64
import secrets

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relayd.control.jointoken import JoinToken
from relayd.errors import AuthError, ConfigError

PIN = "sha256:" + "ab" * 32
SECRET = secrets.token_urlsafe(32)


def make(**over):
    fields = {"address": "relay.example.com:7443", "pin": PIN, "token_id": "abcdEFGH1234",
              "secret": SECRET}
    fields.update(over)
    return JoinToken(**fields)


def pack(obj) -> str:
    return "relayd1." + base64.urlsafe_b64encode(msgpack.packb(obj)).rstrip(b"=").decode()


def good_fields():
    return {"a": "relay.example.com:7443", "p": PIN, "i": "abcdEFGH1234", "s": SECRET}


@pytest.mark.parametrize(
    "address", ["relay.example.com:7443", "127.0.0.1:1", "[::1]:65535", "[fe80::1]:443"]
)
def test_round_trip(address):
    tok = make(address=address)
    text = tok.encode()
    assert text.startswith("relayd1.") and "=" not in text
    assert JoinToken.decode(text) == tok
    assert JoinToken.decode("  " + text + "\n") == tok


def test_wire_layout():
    body = make().encode()[len("relayd1."):]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert msgpack.unpackb(raw) == good_fields()


def test_repr_hides_secret():
    tok = make()
    assert SECRET not in repr(tok) and SECRET not in str(tok)
    assert "abcdEFGH1234" in repr(tok)


def test_errors_hide_secret():
    # A secret too short to be valid still must not be echoed.
    bad = dict(good_fields(), s="S3CR3T" * 4)
    with pytest.raises(AuthError) as info:
        JoinToken.decode(pack(bad))
    assert "S3CR3T" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        make(secret="S3CR3T").encode()
    assert "S3CR3T" not in str(info.value)


def _drop(key):
    f = good_fields()
    del f[key]
    return f


MALFORMED = {
    "empty": "",
    "prefix only": "relayd1.",
    "wrong prefix": "relayd2." + make().encode()[8:],
    "no prefix": make().encode()[8:],
    "upper prefix": "RELAYD1." + make().encode()[8:],
    "bad base64 char": "relayd1.abc$def",
    "padding": make().encode() + "==",
    "base64 length": "relayd1.A",
    "space inside": make().encode()[:20] + " " + make().encode()[20:],
    "non-canonical": "relayd1.AB",  # 'B' carries non-zero unused bits
    "truncated": make().encode()[:-5],
    "trailing msgpack": pack(good_fields())[:8] + base64.urlsafe_b64encode(
        msgpack.packb(good_fields()) + b"\x00").rstrip(b"=").decode(),
    "not a map": pack(["a", "p", "i", "s"]),
    "int": pack(7),
    "missing a": pack(_drop("a")),
    "missing s": pack(_drop("s")),
    "extra field": pack(dict(good_fields(), x=1)),
    "int key": "relayd1." + base64.urlsafe_b64encode(
        msgpack.packb({1: 2, **good_fields()})).rstrip(b"=").decode(),
    "bytes secret": pack(dict(good_fields(), s=SECRET.encode())),
    "int port": pack(dict(good_fields(), a=7443)),
    "no port": pack(dict(good_fields(), a="relay.example.com")),
    "port 0": pack(dict(good_fields(), a="relay:0")),
    "port too big": pack(dict(good_fields(), a="relay:65536")),
    "bare ipv6": pack(dict(good_fields(), a="::1:443")),
    "bad host": pack(dict(good_fields(), a="re lay:443")),
    "pin no prefix": pack(dict(good_fields(), p="ab" * 32)),
    "pin short": pack(dict(good_fields(), p="sha256:" + "ab" * 31)),
    "pin upper": pack(dict(good_fields(), p="sha256:" + "AB" * 32)),
    "pin sha1": pack(dict(good_fields(), p="sha1:" + "ab" * 32)),
    "id short": pack(dict(good_fields(), i="abc")),
    "id long": pack(dict(good_fields(), i="a" * 17)),
    "id chars": pack(dict(good_fields(), i="abcd/efgh")),
    "secret short": pack(dict(good_fields(), s="a" * 31)),
    "secret chars": pack(dict(good_fields(), s="+" * 40)),
    "too long": "relayd1." + "A" * 5000,
    "none": None,
    "bytes": make().encode().encode(),
}


@pytest.mark.parametrize("text", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(text):
    with pytest.raises(AuthError, match="^malformed join token: "):
        JoinToken.decode(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_only_auth_error(text):
    for candidate in (text, "relayd1." + text):
        try:
            JoinToken.decode(candidate)
        except AuthError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_auth_error(raw):
    try:
        JoinToken.decode("relayd1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    except AuthError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=80)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "p", "i", "s", "x"]), _values))
def test_random_maps_only_auth_error(fields):
    merged = dict(good_fields(), **fields)
    try:
        tok = JoinToken.decode(pack(merged))
    except AuthError:
        return
    assert tok.encode() == pack(merged) or JoinToken.decode(tok.encode()) == tok
