"""Admission on the TLS listeners: caps on unauthenticated connections per
node and per source, file-descriptor headroom, handshake failures that are
classified and counted, and listeners that fail to bind with one clear
error. Real TLS over loopback; attackers bind 127.0.0.2 so that the per-source
cap they hit is not the bystander's (127.0.0.1)."""

import asyncio
import socket
import ssl
from pathlib import Path

import pytest

from relayd.control.ca import CertificateAuthority, generate_key_and_csr
from relayd.core.config import AdmissionConfig
from relayd.errors import ConfigError
from relayd.net import admission, run, tls
from tests.metric import bad_input as bad
from tests.waiting import until

ATTACKER = "127.0.0.2"


class Echo(asyncio.Protocol):
    """The protocol behind admission: echoes, and counts as proven once it
    has seen its first bytes (as a preamble or a request head would)."""

    def __init__(self, ticket):
        self.ticket = ticket

    def connection_made(self, t):
        self.t = t

    def data_received(self, d):
        self.ticket.release()
        self.t.write(d)

    def connection_lost(self, exc):
        self.ticket.release()


@pytest.fixture
def pki(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    chain, key = ca.issue_server_cert(["localhost", "127.0.0.1"])
    (tmp_path / "s.crt").write_bytes(chain)
    (tmp_path / "s.key").write_bytes(key)
    ctx = tls.server_context(str(tmp_path / "s.crt"), str(tmp_path / "s.key"), client_ca=str(ca.cert_path))
    return tmp_path, ca, ctx


async def _listener(ctx, **cfg):
    adm = admission.Admission(AdmissionConfig(**cfg))
    lst = admission.TlsListener(adm, "test", admission.bind("127.0.0.1", 0, "test"), ctx, Echo)
    return adm, lst


async def _tls_echo(tmp, ca, port, client_cert=None, source="127.0.0.1"):
    ctx = tls.client_context(str(ca.cert_path), **(client_cert or {}))
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    r, w = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="localhost")
    w.write(b"hello")
    data = await asyncio.wait_for(r.readexactly(5), 5)
    w.close()
    return data


def _raw(port, source=ATTACKER, timeout=5):
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def _reset_at_once(port, source):
    """A connection that is reset (RST) before a two-second deadline, whether
    the reset overtakes connect() or arrives on the first read."""
    try:
        s = _raw(port, source, timeout=2)
        try:
            s.recv(1)
            return False
        finally:
            s.close()
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_source_of_groups_ipv6_by_64():
    assert admission.source_of("192.0.2.7") == "192.0.2.7"
    assert admission.source_of("2001:db8:1:2:aaaa::1") == admission.source_of("2001:db8:1:2:bbbb::9")
    assert admission.source_of("2001:db8:1:2::1") != admission.source_of("2001:db8:1:3::1")
    assert admission.source_of("::ffff:192.0.2.7") == "192.0.2.7"


def test_tickets_count_per_source_and_node():
    adm = admission.Admission(AdmissionConfig(max_unauthenticated=5, max_unauthenticated_per_source=3))
    a = [adm.admit(10, "192.0.2.1", "t") for _ in range(4)]
    assert all(a[:3]) and a[3] is None
    b = [adm.admit(10, "192.0.2.2", "t") for _ in range(3)]
    assert all(b[:2]) and b[2] is None  # node cap: 5
    a[0].release()
    a[0].release()  # idempotent
    assert adm.total == 4 and adm.admit(10, "192.0.2.2", "t") is not None
    for t in a[1:3] + b[:2]:
        t.release()
    assert adm.by_source == {"192.0.2.2": 1}


def test_fd_headroom_refuses_before_the_limit():
    adm = admission.Admission(AdmissionConfig(fd_headroom=100))
    adm.fd_limit, adm.headroom = 1000, 100
    before = bad("t", "fd_headroom")
    assert adm.admit(899, "192.0.2.1", "t") is not None
    assert adm.admit(900, "192.0.2.1", "t") is None
    assert bad("t", "fd_headroom") == before + 1


def test_per_source_cap_resets_the_excess_and_spares_others(pki):
    tmp, ca, ctx = pki

    async def main():
        adm, lst = await _listener(ctx, max_unauthenticated_per_source=8)
        before = bad("test", "source_cap")
        held = [await asyncio.to_thread(_raw, lst.port) for _ in range(8)]
        await until(lambda: adm.total == 8, 5, "the 8 connections were not all admitted")
        assert await asyncio.to_thread(_reset_at_once, lst.port, ATTACKER)
        assert bad("test", "source_cap") == before + 1
        # The bystander from another source is admitted meanwhile.
        assert await _tls_echo(tmp, ca, lst.port) == b"hello"
        for s in held:
            s.close()
        await until(lambda: adm.total == 0, 5, "closed connections kept their admission")
        lst.close()

    run(main())


def test_node_cap_holds_whatever_the_sources(pki):
    tmp, ca, ctx = pki

    async def main():
        adm, lst = await _listener(ctx, max_unauthenticated=6, max_unauthenticated_per_source=2)
        held = []
        for i in range(3):
            for _ in range(2):
                held.append(await asyncio.to_thread(_raw, lst.port, f"127.0.0.{10 + i}"))
        await until(lambda: adm.total == 6, 5, "the 6 connections were not all admitted")
        before = bad("test", "node_cap")
        assert await asyncio.to_thread(_reset_at_once, lst.port, "127.0.0.20")
        assert bad("test", "node_cap") == before + 1
        for h in held:
            h.close()
        lst.close()

    run(main())


@pytest.mark.parametrize("payload,kind", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
    (b"\x00" * 64, "not_tls"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls"),
    (b"", "eof_in_handshake"),
])
def test_failed_handshakes_are_classified_and_counted(pki, payload, kind):
    tmp, ca, ctx = pki

    async def main():
        adm, lst = await _listener(ctx)
        before = bad("test", kind)

        def poke():
            s = _raw(lst.port)
            if payload:
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            try:
                s.recv(100)
            except OSError:
                pass
            s.close()

        await asyncio.to_thread(poke)
        await until(lambda: bad("test", kind) == before + 1, 5, f"{kind} was not counted")
        assert adm.total == 0
        assert await _tls_echo(tmp, ca, lst.port) == b"hello"
        lst.close()

    run(main())


def test_handshake_timeout_is_counted(pki):
    tmp, ca, ctx = pki

    async def main():
        adm, lst = await _listener(ctx, handshake_timeout=0.3)
        before = bad("test", "tls_timeout")
        s = await asyncio.to_thread(_raw, lst.port)
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        await until(lambda: bad("test", "tls_timeout") == before + 1, 5, "the handshake timeout was not counted")
        assert adm.total == 0
        s.close()
        lst.close()

    run(main())


def test_foreign_and_expired_client_certificates_are_counted(pki):
    tmp, ca, ctx = pki
    other = CertificateAuthority.load_or_create(tmp / "other-ca")

    def client_cert(issuer, days, name):
        key, csr = generate_key_and_csr("relayd-agent")
        (tmp / f"{name}.key").write_bytes(key)
        (tmp / f"{name}.crt").write_bytes(issuer.sign_agent_csr(csr, "ag-0123456789ab", days=days))
        return {"cert_file": str(tmp / f"{name}.crt"), "key_file": str(tmp / f"{name}.key")}

    foreign = client_cert(other, 1, "foreign")
    expired = client_cert(ca, 1 / 86400, "expired")  # one second
    good = client_cert(ca, 1, "good")

    async def main():
        await asyncio.sleep(1.5)  # kept: the point: the one-second certificate has expired
        adm, lst = await _listener(ctx)
        for cert, kind in ((foreign, "client_cert_untrusted"), (expired, "client_cert_expired")):
            before = bad("test", kind)
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _tls_echo(tmp, ca, lst.port, cert)
            await until(lambda: bad("test", kind) == before + 1, 5, f"{kind} was not counted")
        assert await _tls_echo(tmp, ca, lst.port, good) == b"hello"
        lst.close()

    run(main())


def test_bind_errors_are_one_clear_line():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(ConfigError, match=r"serve.agents: cannot listen on 127.0.0.1:\d+: the address is already in use"):
        admission.bind("127.0.0.1", port, "serve.agents")
    # A documentation address (TEST-NET-1) is no address of this host: bind
    # fails at once; no packet is ever sent.
    with pytest.raises(ConfigError, match="not one of this host's"):
        admission.bind("192.0.2.1", 0, "serve.https")
    taken.close()


def test_known_sources_get_in_past_a_full_node_cap():
    """A flood from many addresses fills the node cap; a source that proved
    an identity before (an agent's) still gets in, from a bounded reserve."""
    adm = admission.Admission(AdmissionConfig(max_unauthenticated=8, max_unauthenticated_per_source=8))
    agent = adm.admit(10, "192.0.2.50", "t")
    agent.proven()
    flood = [adm.admit(10, f"198.51.100.{i}", "t") for i in range(8)]
    assert all(flood) and adm.admit(10, "198.51.100.99", "t") is None
    extra = [adm.admit(10, "192.0.2.50", "t") for _ in range(adm.reserve + 1)]
    assert all(extra[:adm.reserve]) and extra[adm.reserve] is None


EMFILE_SCRIPT = r"""
import asyncio, os, resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
sys.path.insert(0, sys.argv[3])
from relayd.core.config import AdmissionConfig
from relayd.net import admission, run, tls
from tests.metric import bad_input, value
from tests.waiting import until
ctx = tls.server_context(sys.argv[1], sys.argv[2])

async def main():
    adm = admission.Admission(AdmissionConfig(fd_headroom=16))
    lst = admission.TlsListener(adm, "test", admission.bind("127.0.0.1", 0, "test"), ctx, lambda t: asyncio.Protocol())
    filler = []
    try:
        while True:
            filler.append(open(os.devnull))
    except OSError:
        pass
    print(lst.port, flush=True)
    sys.stdin.readline()  # the test has connected: accept() hits EMFILE
    exhausted = lambda: value("relayd_resource_exhausted_total", listener="test", resource="file_descriptors")
    await until(exhausted, 5, "EMFILE was not counted")
    print(exhausted(), adm.total, flush=True)
    for f in filler:
        f.close()
    # Accepting resumes: the waiting client is taken (admitted, or timed out since).
    taken = lambda: bad_input("test", "tls_timeout") + adm.total
    await until(taken, 10, "the waiting client was never taken")
    print(exhausted() > 0, flush=True)
    print(taken(), flush=True)

run(main())
"""


def test_out_of_descriptors_pauses_accepting_and_is_counted(pki):
    """accept() failing with EMFILE is counted and logged (libuv would close
    such connections silently), accepting pauses, and resumes once
    descriptors are free again."""
    import subprocess
    import sys

    tmp, ca, ctx = pki
    repo = str(Path(__file__).resolve().parents[2])
    p = subprocess.Popen([sys.executable, "-c", EMFILE_SCRIPT, str(tmp / "s.crt"), str(tmp / "s.key"), repo],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(p.stdout.readline())
        c = socket.create_connection(("127.0.0.1", port), 5)
        p.stdin.write("go\n")
        p.stdin.flush()
        exhausted, admitted = p.stdout.readline().split()
        assert float(exhausted) >= 1 and admitted == "0"
        assert p.stdout.readline().strip() == "True"
        assert float(p.stdout.readline()) == 1  # the client was taken once descriptors were back
        c.close()
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
