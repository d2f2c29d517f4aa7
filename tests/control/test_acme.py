"""relayd.control.acme without a server: JWS checked by an independent
library (PyJWT), RFC 7638's thumbprint vector, the account key file, the
[acme] table, the server's answers read strictly (problem documents,
Retry-After, orders, authorizations, chains), badNonce retried with the
nonce that came with the refusal."""

import base64
import hashlib
import json
import os
import threading

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relayd.config import load_serve
from relayd.control import acme
from relayd.control.ca import CertificateAuthority
from relayd.errors import ConfigError


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@pytest.mark.parametrize("make", [lambda: ec.generate_private_key(ec.SECP256R1()),
                                  lambda: rsa.generate_private_key(65537, 2048)])
def test_jws_verifies_with_pyjwt(make):
    priv = make()
    key = acme.AccountKey(priv)
    doc = json.loads(key.jws("https://ca.test/acme/new-order", "nonce-1", {"identifiers": []},
                             "https://ca.test/acct/1"))
    compact = f"{doc['protected']}.{doc['payload']}.{doc['signature']}"
    got = jwt.api_jws.PyJWS().decode_complete(compact, priv.public_key(), algorithms=[key.alg])
    assert json.loads(got["payload"]) == {"identifiers": []}
    assert got["header"] == {"alg": key.alg, "nonce": "nonce-1", "url": "https://ca.test/acme/new-order",
                             "kid": "https://ca.test/acct/1"}
    # newAccount carries the JWK, whose thumbprint PyJWT's reading of it agrees with.
    doc = json.loads(key.jws("https://ca.test/new-acct", "n2", {}, None))
    header = json.loads(_b64d(doc["protected"]))
    assert "kid" not in header and header["jwk"] == key.jwk
    pub = jwt.PyJWK(header["jwk"], key.alg).key
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    assert pub.public_bytes(serialization.Encoding.DER, der) == \
        priv.public_key().public_bytes(serialization.Encoding.DER, der)
    # POST-as-GET: the empty payload.
    assert json.loads(key.jws("https://ca.test/o/1", "n3", None, "k"))["payload"] == ""


def test_thumbprint_rfc7638_vector():
    jwk = {"kty": "RSA", "e": "AQAB", "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
        "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8"
        "KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_"
        "xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")}
    assert acme.jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_account_key_file(tmp_path):
    path = tmp_path / "account.key"
    with pytest.raises(FileNotFoundError):
        acme.load_account_key(path)
    path.write_bytes(acme.new_account_key())
    os.chmod(path, 0o600)
    assert acme.load_account_key(path).alg == "ES256"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others.*chmod 600"):
        acme.load_account_key(path)
    secret_looking = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n"
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for data, why in ((secret_looking, "not an unencrypted PEM private key"), (b"", "not an unencrypted"),
                      (p384, "ECDSA P-256 or RSA")):
        path.write_bytes(data)
        os.chmod(path, 0o600)
        with pytest.raises(ConfigError, match=why) as exc:
            acme.load_account_key(path)
        assert "c2VjcmV0" not in str(exc.value)


def test_acme_table(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")

    def load(body: str):
        f = tmp_path / "r.toml"
        f.write_text("[serve]\nhttps = '127.0.0.1:0'\n[acme]\n" + body)
        return load_serve(f).validate()

    cfg = load(f"directory = 'https://127.0.0.1:14000/dir'\nemail = 'ops@example.com'\nchallenge = 'tls-alpn-01'\n"
               f"renew_before = '20d'\nca = '{ca.cert_path}'\nnames = ['App.Example.com']\nretry = '5s'\n")
    assert (cfg.acme.renew_before, cfg.acme.names, cfg.acme.retry) == (20 * 86400, ["app.example.com"], 5)
    assert load("directory = 'https://acme.test/dir'\n").acme.http_listen == ("0.0.0.0", 80)
    bad = {
        "email = 'a@b.c'\n": "acme.directory' is required",
        "directory = 'http://acme.test/dir'\n": "not an https:// URL",
        "directory = 'https:///dir'\n": "not an https:// URL",
        "directory = 'https://user:pw@acme.test/dir'\n": "no user, password",
        "directory = 'https://acme.test:99999/dir'\n": "not a URL",
        "directory = 'https://acme.test/d ir'\n": "not an https:// URL",
        "directory = 'not a url at all'\n": "not an https:// URL",
        "directory = 5\n": "directory URL",
        "directory = 'https://a.test/d'\nemail = 'two@a.test, three@b.test'\n": "one address",
        "directory = 'https://a.test/d'\nchallenge = 'dns-01'\n": "not one of http-01, tls-alpn-01",
        "directory = 'https://a.test/d'\nhttp_listen = ''\n": "http-01 needs the plain-HTTP listener",
        "directory = 'https://a.test/d'\nrenew_before = '200d'\n": "between 1s and 180d",
        "directory = 'https://a.test/d'\nca = '/nonexistent/ca.pem'\n": "cannot load /nonexistent/ca.pem",
        "directory = 'https://a.test/d'\nnames = ['*.wild.test']\n": "not a DNS name",
        "directory = 'https://a.test/d'\nnames = ['127.0.0.1']\n": "not a DNS name",
        "directory = 'https://a.test/d'\nrenewal = '1d'\n": "'acme.renewal' is not known",
    }
    for body, why in bad.items():
        with pytest.raises(ConfigError, match=why):
            load(body)
    f = tmp_path / "r.toml"
    f.write_text("[acme]\ndirectory = 'https://a.test/d'\n")
    with pytest.raises(ConfigError, match="set serve.https"):
        load_serve(f).validate()


def test_problem_documents():
    doc = {"type": "urn:ietf:params:acme:error:rejectedIdentifier", "status": 400,
           "detail": "Error creating new order \x1b[31m:: no\n" + "x" * 1000,
           "subproblems": [{"type": "urn:ietf:params:acme:error:caa", "detail": "CAA forbids",
                            "identifier": {"type": "dns", "value": "b.example"}}, "junk"]}
    p = acme.problem_of(400, "application/problem+json", json.dumps(doc).encode(), "newOrder")
    assert p.kind == "rejectedIdentifier" and p.status == 400
    text = str(p)
    assert text.startswith("newOrder: rejectedIdentifier: Error creating new order")
    assert "\x1b" not in text and "\n" not in text and len(text) < 600
    assert "b.example: caa: CAA forbids" in text
    assert acme.problem_of(503, "text/html", b"<html>down</html>", "newNonce").kind == "http_status"
    other = acme.problem_of(400, "application/problem+json", b'{"type": "about:blank"}', "x")
    assert other.kind == "other"
    assert acme.problem_of(500, "application/problem+json", b"[1, 2]", "x").kind == "http_status"


def test_retry_after():
    now = 1_000_000.0
    assert acme.parse_retry_after("120", now) == 120
    assert acme.parse_retry_after(" 7 ", now) == 7
    assert acme.parse_retry_after("Mon, 12 Jan 1970 13:46:50 GMT", now) == 10
    assert acme.parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now) == 0
    for junk in (None, "", "-5", "soon", "1e3", "١٢", "Mon, 12 Jan 1970 13:46:50"):
        assert acme.parse_retry_after(junk, now) is None


def test_orders_authorizations_and_chains_read_strictly():
    order = {"status": "ready", "authorizations": ["https://ca.test/a/1"], "finalize": "https://ca.test/f/1"}
    assert acme.parse_order(order).finalize == "https://ca.test/f/1"
    for broken in ({**order, "status": "done"}, {**order, "authorizations": []},
                   {**order, "authorizations": ["http://ca.test/a/1"]}, {**order, "finalize": 5},
                   {**order, "status": "valid"}, {**order, "finalize": "https://ca.test/f\r\nX: y"}):
        with pytest.raises(acme.AcmeError) as exc:
            acme.parse_order(broken)
        assert exc.value.kind == "bad_response"
    token = "a" * 43
    authz = {"status": "pending", "identifier": {"type": "dns", "value": "App.Test"},
             "challenges": [{"type": "dns-01", "url": "https://ca.test/c/0", "token": "?", "status": "pending"},
                            {"type": "http-01", "url": "https://ca.test/c/1", "token": token, "status": "pending"}]}
    a = acme.parse_authorization(authz)
    assert a.name == "app.test" and [c.type for c in a.challenges] == ["http-01"]
    for broken in ({**authz, "identifier": {"type": "ip", "value": "10.0.0.1"}},
                   {**authz, "challenges": [{"type": "http-01", "url": "https://c/1", "token": "../../etc",
                                             "status": "pending"}]},
                   {**authz, "challenges": "x"}):
        with pytest.raises(acme.AcmeError):
            acme.parse_authorization(broken)
    for junk in (b"", b"not pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                 acme.new_account_key()):
        with pytest.raises(acme.AcmeError):
            acme.parse_chain(junk)


def test_tls_alpn_certificate():
    cert_pem, key_pem = acme.tls_alpn_certificate("app.test", "tok.thumb")
    cert = x509.load_pem_x509_certificate(cert_pem)
    ext = cert.extensions.get_extension_for_oid(acme.ACME_IDENTIFIER_OID)
    assert ext.critical and ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()
    assert acme.dns_names(cert) == ["app.test"]


class Scripted(acme.Transport):
    """Answers from a list, recording the requests."""

    def __init__(self, answers):
        super().__init__(None, threading.Event())
        self.answers = list(answers)
        self.sent = []

    def request(self, method, url, body=None, content_type=None, accept="application/json"):
        self.sent.append((method, url, json.loads(body) if body else None))
        return self.answers.pop(0)


def _answer(status, doc=None, **headers):
    h = {k.replace("_", "-").lower(): v for k, v in headers.items()}
    return acme.Response(status, h, json.dumps(doc).encode() if doc is not None else b"")


def test_bad_nonce_is_retried_with_the_nonce_it_came_with():
    directory = {"newNonce": "https://ca.test/nonce", "newAccount": "https://ca.test/acct",
                 "newOrder": "https://ca.test/order"}
    bad = {"type": "urn:ietf:params:acme:error:badNonce", "detail": "JWS has an invalid anti-replay nonce"}
    t = Scripted([_answer(200, directory), _answer(200, replay_nonce="n1"),
                  _answer(400, bad, replay_nonce="n2", content_type="application/problem+json"),
                  _answer(201, {"status": "valid"}, location="https://ca.test/acct/7", replay_nonce="n3")])
    client = acme.AcmeClient("https://ca.test/dir", acme.AccountKey(ec.generate_private_key(ec.SECP256R1())),
                             email="ops@example.com", transport=t)
    assert client.register() == "https://ca.test/acct/7"
    nonces = [json.loads(_b64d(body["protected"]))["nonce"] for m, _, body in t.sent if m == "POST"]
    assert nonces == ["n1", "n2"]
    assert json.loads(_b64d(t.sent[-1][2]["payload"])) == {"termsOfServiceAgreed": True,
                                                           "contact": ["mailto:ops@example.com"]}
    # A server that keeps refusing nonces: given up after NONCE_RETRIES, with its problem.
    t.answers = [_answer(400, bad, replay_nonce=f"m{i}", content_type="application/problem+json")
                 for i in range(acme.NONCE_RETRIES + 1)]
    with pytest.raises(acme.AcmeProblem) as exc:
        client.register()
    assert exc.value.kind == "badNonce" and not t.answers
    # A nonce that is not base64url is not used.
    t = Scripted([_answer(200, directory), _answer(200, replay_nonce="bad nonce\r\n")])
    client = acme.AcmeClient("https://ca.test/dir", client.key, transport=t)
    with pytest.raises(acme.AcmeError, match="no usable Replay-Nonce"):
        client.register()


def test_a_silent_server_times_out_and_stop_cuts_the_request_at_once():
    """A server that accepts and never answers (not even the TLS handshake):
    a request ends at its timeout, or at once when stopped from another thread."""
    import socket
    import time

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    url = f"https://127.0.0.1:{hole.getsockname()[1]}/dir"
    try:
        with pytest.raises(acme.AcmeError) as exc:
            acme.Transport(None, threading.Event(), timeout=0.3).request("GET", url)
        assert exc.value.kind == "timeout"
        cancel = threading.Event()
        t = acme.Transport(None, cancel)
        ended = []

        def call():
            try:
                t.request("GET", url)
            except acme.AcmeError as e:
                ended.append((e.kind, time.monotonic()))

        th = threading.Thread(target=call)
        th.start()
        time.sleep(0.3)
        stopped = time.monotonic()
        cancel.set()
        t.abort()
        th.join(5)
        assert ended and ended[0][0] == "cancelled" and ended[0][1] - stopped < 1
    finally:
        hole.close()
