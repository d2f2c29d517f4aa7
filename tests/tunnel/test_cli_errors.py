"""Hostile environments for the command line: a data directory that is a file
or read-only, a full disk, a relay whose database fails under an enrolling
agent, a database that does not belong to the CA next to it. Each ends with
one `relayd: error: ...` line on stderr and a non-zero exit, never a
traceback, never a secret.

Read-only and full file systems are real ones: a small tmpfs mounted by the
test (root is needed for mount(2); CI runs as root) and always unmounted in a
finally. Without root, the read-only case uses a directory without write
permission instead (root without mount(2) skips it: no directory is
read-only to root), and the full disk is simulated with RLIMIT_FSIZE (Python
ignores SIGXFSZ, so writes past the limit fail with EFBIG); each test prints
which it used.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import sqlite3
import subprocess
import urllib.request

import orjson
import pytest

from relayd.control.jointoken import JoinToken
from relayd.control.store import Store
from tests.tunnel.processes import RELAYD, Proc, cli, free_port, wait_agents_online, wait_port

EX_TEMPFAIL = 75


# -- helpers ---------------------------------------------------------------------------


def assert_clean_error(rc: int, stderr: str, code: int | tuple = (1, 2)) -> str:
    """One `relayd: error:` line (JSON log lines may precede it), the exit
    code, no traceback; returns the line."""
    codes = code if isinstance(code, tuple) else (code,)
    assert rc in codes, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("relayd: error: "), stderr
    return lines[0]


@functools.cache
def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = f"/tmp/relayd-mount-probe-{os.getpid()}"
    os.makedirs(probe, exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "relayd-test", probe],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", probe], check=True)
        return ok
    finally:
        os.rmdir(probe)


@contextlib.contextmanager
def tmpfs(path, size="2m", ro=False):
    """A tmpfs of ``size`` at ``path``, unmounted on the way out whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "relayd-test", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory) -> None:
    """Write until the file system says ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def serve_refused(data, *extra, timeout=20):
    """Run `relayd serve` expecting it to refuse to start: (rc, stderr)."""
    proc = Proc(["serve", "--data", str(data), "--agents", f"127.0.0.1:{free_port()}", *extra])
    try:
        proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(f"relayd serve started on {data} instead of refusing")
    _, err = proc.stop()
    return proc.p.returncode, err


@contextlib.contextmanager
def relay(data, metrics=False):
    agents = free_port()
    args = ["serve", "--data", str(data), "--agents", f"127.0.0.1:{agents}"]
    mport = free_port() if metrics else None
    if metrics:
        args += ["--metrics", f"127.0.0.1:{mport}"]
    proc = Proc(args)
    try:
        wait_port(agents)
        yield proc, agents, mport
    finally:
        proc.stop()


def make_relay_dir(data, agents=0):
    """A data directory made by a real `relayd serve` (started and stopped),
    with ``agents`` agents recorded as if they had enrolled."""
    with relay(data):
        pass
    with Store(data / "relayd.db") as store:
        for i in range(agents):
            store.add_agent(f"ag-{i:04d}", [], 1000 + i, 2e9)


def drop_db(data):
    for p in data.glob("relayd.db*"):
        p.unlink()


def recovery_hint(line, data):
    assert "backup" in line and f"move {data} away" in line and "enroll again" in line, line


# -- a. the data directory is a file, or read-only ---------------------------------------------


def test_data_dir_is_a_regular_file(tmp_path):
    f = tmp_path / "relay"
    f.write_text("not a directory")
    line = assert_clean_error(*serve_refused(f), code=2)
    assert str(f) in line and "not a directory" in line
    res = cli("admin", "join-token", "--data", str(f), check=False)
    assert_clean_error(res.returncode, res.stderr, code=2)
    assert f.read_text() == "not a directory"


def test_read_only_data_directory(tmp_path):
    if can_mount():
        print("read-only tmpfs mounted by the test")
        with tmpfs(tmp_path / "ro", ro=True) as ro:
            line = assert_clean_error(*serve_refused(ro / "relay"), code=2)
            assert str(ro / "relay") in line and "read-only" in line.lower()
        # An existing data directory whose file system became read-only.
        with tmpfs(tmp_path / "rw") as rw:
            make_relay_dir(rw / "relay")
            remount(rw, "ro")
            line = assert_clean_error(*serve_refused(rw / "relay"), code=2)
            assert str(rw / "relay") in line and "read-only" in line.lower()
            for args in (["join-token"], ["agents"], ["revoke-agent", "ag-1"]):
                res = cli("admin", *args, "--data", str(rw / "relay"), check=False)
                line = assert_clean_error(res.returncode, res.stderr)
                assert "read-only" in line.lower() and res.stdout == ""
    elif os.geteuid() == 0:
        pytest.skip("root without mount(2): root writes into any directory, none is read-only to it")
    else:
        print("no mount(2) here: a directory without write permission for this user")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        line = assert_clean_error(*serve_refused(locked / "relay"), code=2)
        assert str(locked / "relay") in line and "permission denied" in line.lower()


# -- b. a full disk -------------------------------------------------------------------------------


def test_join_token_on_a_full_disk(tmp_path):
    with contextlib.ExitStack() as stack:
        if can_mount():
            print("full disk: a 2 MiB tmpfs filled to the last block")
            base = stack.enter_context(tmpfs(tmp_path / "small", size="2m"))
        else:
            print("no mount(2) here: full disk simulated with RLIMIT_FSIZE")
            base = tmp_path
        data = base / "relay"
        # The relay runs (its database is open, as in real life) while the
        # disk fills up under it.
        proc, _, _ = stack.enter_context(relay(data))
        before = cli("admin", "join-token", "--data", str(data)).stdout.strip()
        if can_mount():
            fill(base)
            res = subprocess.run(RELAYD + ["admin", "join-token", "--data", str(data)],
                                 capture_output=True, text=True, timeout=60)
        else:
            limit = max(p.stat().st_size for p in data.glob("relayd.db*"))

            def no_growth():
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

            res = subprocess.run(RELAYD + ["admin", "join-token", "--data", str(data)],
                                 capture_output=True, text=True, timeout=60, preexec_fn=no_growth)
        line = assert_clean_error(res.returncode, res.stderr, code=1)
        assert "relayd.db" in line and res.stdout == ""
        if can_mount():
            assert "full" in line
            (base / "filler").unlink()
        # Nothing was left half-done: the relay and the next command go on.
        after = cli("admin", "join-token", "--data", str(data)).stdout.strip()
        assert after.startswith("relayd1.") and after != before
        assert proc.p.poll() is None


# -- c. the relay fails while an agent enrolls ------------------------------------------------------


def _break_agent_inserts(data):
    # What a failing disk does to the relay's database mid-enrollment: the
    # token check passes, then recording the agent fails (SQLite reports an
    # OperationalError: the trigger calls a function that does not exist).
    raw = sqlite3.connect(data / "relayd.db")
    raw.execute("CREATE TRIGGER broken BEFORE INSERT ON agents BEGIN SELECT relayd_no_such_function(); END")
    raw.close()


def _fix_agent_inserts(data):
    raw = sqlite3.connect(data / "relayd.db")
    raw.execute("DROP TRIGGER broken")
    raw.close()


def test_enrollment_while_the_relay_store_fails(tmp_path):
    data = tmp_path / "relay"
    with relay(data, metrics=True) as (proc, _, mport):
        token = cli("admin", "join-token", "--data", str(data)).stdout.strip()
        secret = JoinToken.decode(token).secret
        _break_agent_inserts(data)
        agent_args = ["agent", "--join", token, "--endpoint", "e=127.0.0.1:9"]
        res = subprocess.run(RELAYD + agent_args + ["--data", str(tmp_path / "a1")],
                             capture_output=True, text=True, timeout=60)
        line = assert_clean_error(res.returncode, res.stderr, code=EX_TEMPFAIL)
        assert "relay could not complete the enrollment" in line and "try again" in line
        assert secret not in res.stderr
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert 'relayd_enrollments_total{kind="enroll",result="error"} 1.0' in text
        # The relay failed after the token checked out: the token is not spent.
        _fix_agent_inserts(data)
        agent = Proc(agent_args + ["--data", str(tmp_path / "a2")])
        try:
            wait_agents_online(data, 1)
        finally:
            agent.stop()
        # A refusal is final, and says so with a different exit code.
        res = subprocess.run(RELAYD + agent_args + ["--data", str(tmp_path / "a3")],
                             capture_output=True, text=True, timeout=60)
        line = assert_clean_error(res.returncode, res.stderr, code=1)
        assert "refused" in line and "already used" in line
        relay_out, relay_err = proc.stop()
    failed = [ln for ln in relay_err.splitlines() if "agent request failed" in ln]
    assert len(failed) == 1, relay_err
    entry = orjson.loads(failed[0])
    assert entry["op"] == "enroll" and entry["level"] == "error"
    for log in (relay_err, relay_out):
        assert secret not in log and "CERTIFICATE REQUEST" not in log and "Traceback" not in log


def test_enroll_with_a_bad_csr_does_not_spend_the_token(tmp_path):
    """Refusals after the token checked out (here: a CSR that is not one)
    leave the token for the real agent."""
    import asyncio

    from relayd.net import run, tls
    from relayd.core import wire
    from relayd.net.preamble import ClientPreamble
    from tests.tunnel.util import join_token, start_agent, start_relay

    async def main():
        relay_node = await start_relay(tmp_path)
        try:
            token = join_token(relay_node)
            t = JoinToken.decode(token)
            pre = ClientPreamble(wire.EnrollRequest(t.token_id, t.secret, "not a CSR"))
            ctx = tls.client_context(str(relay_node.ca_path))
            tr, _ = await asyncio.get_running_loop().create_connection(
                lambda: pre, "127.0.0.1", relay_node.agents_port, ssl=ctx, server_hostname="127.0.0.1")
            reply = await asyncio.wait_for(pre.reply, 10)
            tr.close()
            assert reply["ok"] is False and "certificate request" in reply["error"]
            agent = await start_agent(tmp_path, "a1", token, {"echo": ("127.0.0.1", 9)})
            await agent.stop()
        finally:
            await relay_node.stop()

    run(main())


# -- d. the database and the CA do not belong together -------------------------------------------------


def test_empty_database_next_to_existing_ca_refused(tmp_path):
    data = tmp_path / "relay"
    make_relay_dir(data, agents=2)
    drop_db(data)
    (data / "relayd.db").write_bytes(b"")
    line = assert_clean_error(*serve_refused(data), code=2)
    assert "relayd.db" in line and "empty" in line
    recovery_hint(line, data)
    for args in (["join-token"], ["agents"]):
        res = cli("admin", *args, "--data", str(data), check=False)
        assert assert_clean_error(res.returncode, res.stderr, code=2) == line
    # Still refused the second time: the refusal created no schema.
    assert (data / "relayd.db").stat().st_size == 0
    assert_clean_error(*serve_refused(data), code=2)


def test_missing_database_next_to_existing_ca_refused(tmp_path):
    data = tmp_path / "relay"
    make_relay_dir(data, agents=1)
    drop_db(data)
    line = assert_clean_error(*serve_refused(data), code=2)
    assert "relayd.db" in line and "missing" in line
    recovery_hint(line, data)
    res = cli("admin", "join-token", "--data", str(data), check=False)
    assert_clean_error(res.returncode, res.stderr, code=2)
    assert not (data / "relayd.db").exists()


def test_database_of_another_relay_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_relay_dir(a, agents=1)
    make_relay_dir(b, agents=1)
    drop_db(a)
    shutil.copy(b / "relayd.db", a / "relayd.db")
    line = assert_clean_error(*serve_refused(a), code=2)
    assert "another CA" in line
    recovery_hint(line, a)


def test_missing_ca_with_enrolled_agents_refused(tmp_path):
    data = tmp_path / "relay"
    make_relay_dir(data, agents=1)
    shutil.rmtree(data / "ca")
    line = assert_clean_error(*serve_refused(data), code=2)
    assert "ca.crt" in line and "1 agent" in line
    recovery_hint(line, data)
    assert not (data / "ca" / "ca.crt").exists()


def test_database_from_before_the_pin_still_starts(tmp_path):
    data = tmp_path / "relay"
    make_relay_dir(data, agents=1)
    raw = sqlite3.connect(data / "relayd.db")
    with raw:
        raw.execute("DELETE FROM meta WHERE key = 'ca_pin'")
    raw.close()
    assert "ag-0000" in cli("admin", "agents", "--data", str(data)).stdout
    with relay(data) as (proc, _, _):
        assert proc.p.poll() is None


# -- e. anything else on the way -----------------------------------------------------------------


def test_corrupt_relay_json(tmp_path):
    data = tmp_path / "relay"
    make_relay_dir(data)
    (data / "relay.json").write_bytes(b"{not json")
    res = cli("admin", "join-token", "--data", str(data), check=False)
    line = assert_clean_error(res.returncode, res.stderr, code=2)
    assert "relay.json" in line and res.stdout == ""


def test_agent_data_dir_is_a_regular_file(tmp_path):
    f = tmp_path / "agent"
    f.write_text("x")
    res = subprocess.run(RELAYD + ["agent", "--data", str(f), "--join", "relayd1.AAAA", "--endpoint",
                                   "e=127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    line = assert_clean_error(res.returncode, res.stderr)
    assert str(f) in line


@pytest.mark.parametrize("flag,what", [("--https", "serve.https"), ("--metrics", "serve.metrics"),
                                       ("--tcp", "serve.tcp.web")])
def test_listen_address_in_use_is_one_line(tmp_path, flag, what):
    """Defect: a raw OSError traceback. Now one line naming the key and the
    address, exit 2, and nothing left listening."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    value = f"web=127.0.0.1:{port}" if flag == "--tcp" else f"127.0.0.1:{port}"
    try:
        rc, err = serve_refused(tmp_path / "relay", flag, value)
        line = assert_clean_error(rc, err, 2)
        assert f"{what}: cannot listen on 127.0.0.1:{port}: the address is already in use" in line
    finally:
        taken.close()


def test_listen_address_not_of_this_host_is_one_line(tmp_path):
    # A documentation address (TEST-NET-1): bind fails at once, no packet is sent.
    rc, err = serve_refused(tmp_path / "relay", "--https", "192.0.2.1:8443")
    line = assert_clean_error(rc, err, 2)
    assert "serve.https: cannot listen on 192.0.2.1:8443: the address is not one of this host's" in line
