"""The one Crockford base32 spelling of OTPs and claim codes."""

import hashlib
import hmac

from relayd.control import crockford, devices, provisioning


def test_encoding_is_most_significant_first():
    assert crockford.encode(0, 4) == "0000"
    assert crockford.encode(31, 2) == "0Z"
    assert crockford.encode(1 << 75, 16) == "1" + "0" * 15
    assert crockford.encode_bytes(b"\xff" * 5) == "Z" * 8
    assert crockford.encode_bytes(bytes(range(10))) == crockford.encode(int.from_bytes(bytes(range(10)), "big"), 16)


def test_claim_code_is_the_hmac_in_base32():
    key, dev = bytes(32), "dv-0123456789ab"
    mac = int.from_bytes(hmac.new(key, b"relayd claim code\0" + dev.encode(), hashlib.sha256).digest()[:10], "big")
    want = "".join(crockford.ALPHABET[(mac >> (75 - 5 * i)) & 31] for i in range(16))
    code = devices.claim_code(key, dev)
    assert code.replace("-", "") == want and [len(g) for g in code.split("-")] == [4, 4, 4, 4]


def test_typed_codes_read_one_way():
    code = "7K3M-Q9XA-0011-ZZZZ"
    for typed in ("7k3m-q9xa-oo1i-zzzz", " 7K3M Q9XA 0O1L ZZZZ", "7K3MQ9XA0011ZZZZ"):
        assert devices.normalize_code(typed) == code.replace("-", "")
    for bad in ("7K3M-Q9XA-0011-ZZZU", "7K3M-Q9XA-0011-ZZZ", "7K3M-Q9XA-0011-ZZZZ0", None, 5, "-" * 65, "7K3M_Q9XA"):
        assert devices.normalize_code(bad) is None
    otp = provisioning.new_otp()
    assert provisioning.canonical(otp.lower()) == otp and provisioning.canonical(otp[:-1]) is None
