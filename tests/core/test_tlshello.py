"""relayd.core.tlshello: the server name and ALPN list of real ClientHellos
(made by OpenSSL through Python's ssl), and nothing but HelloError for
anything else."""

import random
import ssl

import pytest

from relayd.core.tlshello import ClientHello, HelloError, parse_client_hello, record_length


def client_hello(server_name=None, alpn=None, tls13_only=False) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls13_only:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        ctx.set_alpn_protocols(alpn)
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


@pytest.mark.parametrize("name, alpn", [
    ("app.example", ["acme-tls/1"]),
    ("Relay.Example.COM", ["relayd", "http/1.1"]),
    ("x.test", None),
    (None, ["h2", "http/1.1"]),
])
def test_real_client_hellos(name, alpn):
    data = client_hello(name, alpn)
    assert record_length(data) == len(data)
    hello = parse_client_hello(data + b"more bytes of the next record")
    assert hello == ClientHello(name.lower() if name else None, tuple(p.encode() for p in alpn or ()))


def test_partial_records_and_other_protocols():
    data = client_hello("app.example", ["acme-tls/1"], tls13_only=True)
    assert record_length(data[:4]) is None and record_length(b"") is None
    for cut in range(len(data)):
        with pytest.raises(HelloError):
            parse_client_hello(data[:cut])
    for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x02\x00\x00\x05hello", b"\x16\x03\x01\x00\x00",
                 b"\x16\x03\x01\x40\x01" + b"\x00" * 20, b"\x17\x03\x03\x00\x05abcde", b"SSH-2.0-x\r\n"):
        with pytest.raises(HelloError):
            record_length(junk) and parse_client_hello(junk)


def _with_extensions(data: bytes, extra: bytes) -> bytes:
    """``data`` (a ClientHello record) with ``extra`` appended to its
    extensions, every length fixed up."""
    sid = data[43]
    pos = 44 + sid
    pos += 2 + int.from_bytes(data[pos:pos + 2], "big")
    pos += 1 + data[pos]
    ext_len = int.from_bytes(data[pos:pos + 2], "big")
    body = data[9:pos] + (ext_len + len(extra)).to_bytes(2, "big") + data[pos + 2:pos + 2 + ext_len] + extra
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return data[:3] + len(hs).to_bytes(2, "big") + hs


def test_hostile_extensions():
    base = client_hello("app.example", ["http/1.1"])
    assert parse_client_hello(_with_extensions(base, b"\xfa\xfa\x00\x00")).server_name == "app.example"
    sni = b"\x00\x00"
    alpn = b"\x00\x10"
    cases = [
        sni + b"\x00\x05\x00\x03\x00\x00\x00",  # a second server_name extension
        alpn + b"\x00\x03\x00\x01\x00",  # a second ALPN extension
        b"\x00\x2a\x00\x09\x00",  # an extension longer than what is left
    ]
    for extra in cases:
        with pytest.raises(HelloError):
            parse_client_hello(_with_extensions(base, extra))
    noalpn = client_hello("app.example")
    for extra in (alpn + b"\x00\x03\x00\x01\x00",  # an empty protocol name
                  alpn + b"\x00\x02\x00\x00",  # an empty list
                  alpn + b"\x00\x04\x00\x02\x05a"):  # a name longer than its list
        with pytest.raises(HelloError):
            parse_client_hello(_with_extensions(noalpn, extra))
    nosni = client_hello(None, ["h2"])
    for name in (b"", b"a b", b"a\x00b", b"\xffx"):
        ext = b"\x00" + len(name).to_bytes(2, "big") + name
        with pytest.raises(HelloError):
            parse_client_hello(_with_extensions(nosni, sni + (len(ext) + 2).to_bytes(2, "big")
                                                + len(ext).to_bytes(2, "big") + ext))


def test_random_mutations_raise_only_hello_error():
    rnd = random.Random(14)
    seeds = [client_hello("app.example", ["acme-tls/1"]), client_hello(None, ["relayd", "http/1.1"])]
    for _ in range(3000):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
        try:
            hello = parse_client_hello(bytes(data))
        except HelloError:
            continue
        assert hello.server_name is None or hello.server_name.isascii()
        assert all(p for p in hello.alpn)
