"""Provisioning OTPs (relayd.control.provisioning) and the EST request
reader (relayd.control.est), without a network: the code's form, lifetimes,
one winner of a race, revocation, the CLI and the config keys."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import threading
import time

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from relayd.config import load_serve
from relayd.control import est
from relayd.control.crockford import ALPHABET
from relayd.control.provisioning import MAX_TTL, Otps, canonical, new_otp, parse_ttl
from relayd.control.store import Store, open_data_dir
from relayd.errors import ConfigError


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "relayd.db")
    yield s
    s.close()


def test_codes_are_128_bits_of_crockford_base32():
    codes = {new_otp() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == 26 and set(c) <= set(ALPHABET) for c in codes)
    assert {c[0] for c in codes} <= set("01234567")  # 130 digits' worth of room, 128 bits used
    assert len({c[1] for c in codes}) > 16  # the rest is uniform enough to see
    c = new_otp()
    typed = "-".join(c[i:i + 5] for i in range(0, 26, 5)).lower().replace("0", "o").replace("1", "l")
    assert canonical(typed) == c
    for bad in ("", c[:-1], c + "0", c[:-1] + "U", c[:-1] + "*", "x" * 100, None):
        assert canonical(bad) is None


def test_lifetimes():
    assert parse_ttl("24h") == 86400 and parse_ttl(60) == 60 and parse_ttl("7d") == MAX_TTL
    for bad in ("8d", 0, -1, "0s", True, "soon", float("inf"), MAX_TTL + 1):
        with pytest.raises(ConfigError):
            parse_ttl(bad)


def test_only_the_hash_is_kept_and_states(store):
    otps = Otps(store)
    row, code = otps.create("cam", 3600, {"site": "a"}, actor="test")
    assert row["state"] == "pending" and row["labels"] == {"site": "a"}
    dump = b"".join(bytes(str(r), "utf-8") for r in store.query("SELECT * FROM dc_otps"))
    assert code.encode() not in dump and hashlib.sha256(code.encode()).hexdigest().encode() in dump
    assert otps.usable(code.lower())["otp_id"] == row["otp_id"]
    r1, old = otps.create(ttl=10, now=time.time() - 11)
    assert otps.usable(old) is None and otps.get(r1["otp_id"])["state"] == "expired"
    r2, revoked = otps.create()
    assert otps.revoke(r2["otp_id"]) is True and otps.usable(revoked) is None
    assert otps.revoke("otp-000000000000") is None


def test_one_of_many_racing_enrollments_wins(store):
    otps = Otps(store)
    _, code = otps.create("cam")
    wins, start = [], threading.Barrier(8)

    def enroll(i: int) -> None:
        start.wait(5)
        if otps.redeem(code, f"dv-race{i}", "cam", {}, 1000 + i, time.time() + 86400):
            wins.append(i)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1
    assert [r[0] for r in store.query("SELECT id FROM dc_devices")] == [f"dv-race{wins[0]}"]
    assert len(store.list_agents()) == 1
    assert otps.usable(code) is None and otps.revoke(otps.list()[0]["otp_id"]) is False


def _csr(key, password: str | None = None, algorithm=hashes.SHA256()) -> x509.CertificateSigningRequest:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if password is not None:
        b = b.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
    return b.sign(key, algorithm)


def test_est_reader_takes_what_devices_send_and_nothing_else():
    key = ec.generate_private_key(ec.SECP256R1())
    der = _csr(key, "PW").public_bytes(serialization.Encoding.DER)
    b64 = base64.b64encode(der)
    wrapped = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64)) + b"\n"
    pem = _csr(key).public_bytes(serialization.Encoding.PEM)
    for body in (b64, wrapped, wrapped.replace(b"\n", b"\r\n"), pem):
        est.read_csr(b"application/pkcs10", body)
    est.read_csr(b"Application/PKCS10; charset=binary", b64)
    small_rsa = rsa.generate_private_key(65537, 1024)
    cases = [(b"application/json", b64, 415, "media_type"), (None, b64, 415, "media_type"),
             (b"application/pkcs10", b"", 400, "empty"), (b"application/pkcs10", der, 400, "bad_base64"),
             (b"application/pkcs10", base64.b64encode(der[:-5]), 400, "bad_csr"),
             (b"application/pkcs10", base64.b64encode(_csr(small_rsa).public_bytes(serialization.Encoding.DER)),
              400, "bad_key")]
    for ctype, body, status, reason in cases:
        with pytest.raises(est.EstError) as e:
            est.read_csr(ctype, body)
        assert (e.value.status, e.value.reason) == (status, reason)
    csr = est.read_csr(b"application/pkcs10", b64)
    basic = b"Basic " + base64.b64encode(b"who:OTP1")
    assert est.credential(basic, csr) == ("OTP1", "basic")
    assert est.credential(b"bearer  OTP2 ", csr) == ("OTP2", "bearer")
    assert est.credential(None, csr) == ("PW", "challenge")
    assert est.credential(b"Basic !!!", csr) == ("PW", "challenge")  # an unusable header: the CSR's
    assert est.credential(b"Basic " + base64.b64encode(b"nopassword"), None) == (None, "missing")
    assert est.credential(None, _csr(key)) == (None, "missing")


def test_cli_otp_create_list_revoke(tmp_path):
    ca, store = open_data_dir(tmp_path / "relay", create=True)
    store.close()
    (tmp_path / "relay" / "relay.json").write_bytes(orjson.dumps({"advertised": "127.0.0.1:7000",
                                                                   "https": "relay.example:8443"}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "relayd.cli", "admin", "otp", *args, "--data",
                               str(tmp_path / "relay")], capture_output=True, text=True, timeout=60)

    r = cli("create", "--name", "cam-9", "--label", "site=b", "--ttl", "2h", "--json")
    assert r.returncode == 0, r.stderr
    doc = orjson.loads(r.stdout)
    assert doc["est_url"] == "https://relay.example:8443/.well-known/est" and doc["ca_sha256"] in ca.pin
    assert doc["device_name"] == "cam-9" and doc["labels"] == {"site": "b"}
    r = cli("create")
    code = r.stdout
    assert r.returncode == 0 and len(code.strip()) == 26 and "--pin" in r.stderr
    listing = cli("list").stdout
    assert doc["otp_id"] in listing and "pending" in listing and doc["otp"] not in listing
    assert cli("revoke", doc["otp_id"]).returncode == 0
    assert "revoked" in cli("list").stdout
    assert cli("revoke", "otp-000000000000").returncode != 0
    assert cli("create", "--ttl", "30d").returncode != 0
    # a fleet: one request, one code a line, names PREFIX001 ...
    r = cli("create", "--count", "120", "--name", "cam-", "--label", "batch=7")
    codes = r.stdout.split()
    assert r.returncode == 0 and len(codes) == len(set(codes)) == 120 and all(len(c) == 26 for c in codes)
    assert "ids otp-" in r.stderr and "--otp OTP" in r.stderr
    docs = [orjson.loads(line) for line in cli("create", "--count", "3", "--json").stdout.splitlines()]
    assert len(docs) == 3 and all(d["device_name"] is None and d["est_url"] for d in docs)
    listing = cli("list").stdout
    assert "cam-001" in listing and "cam-120" in listing
    for bad in ("0", "1001", "x"):
        assert cli("create", "--count", bad).returncode != 0


def test_config_keys(tmp_path):
    conf = tmp_path / "r.toml"
    conf.write_text('[serve]\nadmin_allow = ["10.0.0.0/8", "2001:db8::/32"]\n')
    assert [str(n) for n in load_serve(conf).admin_allow] == ["10.0.0.0/8", "2001:db8::/32"]
    conf.write_text('[serve]\nadmin_allow = ["nonsense"]\n')
    with pytest.raises(ConfigError):
        load_serve(conf)
