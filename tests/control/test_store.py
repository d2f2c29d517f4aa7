"""The SQLite store: single-use join tokens under races, agents, revocation."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading

import pytest

from relayd.control.store import SCHEMA_VERSION, Store
from relayd.errors import AuthError, ConfigError

BIG_SERIAL = (1 << 127) | 12345  # beyond SQLite's 64-bit integers


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "relayd.db"


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


# -- opening ----------------------------------------------------------------


def test_open_sets_up_wal_and_schema(db_path, store):
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()
    # Reopening an existing database keeps its data.
    tid, _ = store.create_join_token(["web"], 60)
    with Store(db_path) as again:
        with pytest.raises(AuthError, match="secret does not match"):
            again.redeem_join_token(tid, "x" * 43)


def test_a_write_waits_for_another_writer(db_path, store):
    """Another process (``relayd admin``) holding the write lock for a
    moment delays the store's write; it does not fail it."""
    other = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    # kept: the point: the other writer holds its lock for a moment, then commits
    release = threading.Timer(0.3, other.execute, ["COMMIT"])
    release.start()
    try:
        tid, secret = store.create_join_token([], 60)
        assert store.redeem_join_token(tid, secret) == []
    finally:
        release.join()
        other.close()


def test_refuses_newer_schema(db_path):
    Store(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(ConfigError, match="newer"):
        Store(db_path)


def test_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="cannot open database"):
        Store(tmp_path / "nope" / "relayd.db")


def test_not_a_database(db_path):
    db_path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError):
        Store(db_path)


# -- join tokens --------------------------------------------------------------


def test_token_stored_hashed(db_path, store):
    tid, secret = store.create_join_token(["a", "b"], 900, now=1000.0)
    assert 8 <= len(tid) <= 16 and len(secret) >= 32
    raw = sqlite3.connect(db_path)  # what a copy of the disk shows
    row = raw.execute("SELECT * FROM join_tokens").fetchone()
    raw.close()
    assert secret not in repr(row)
    for f in db_path.parent.iterdir():  # the database and its -wal, -shm files
        assert secret.encode() not in f.read_bytes()
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert row[3:] == (1000.0, 1900.0, None, None, None)  # used_at, revoked_at, agent_id


def test_join_tokens_listed_revoked_and_linked_to_their_agent(store):
    a, sa = store.create_join_token(["web"], 900, now=1000.0)
    b, sb = store.create_join_token([], 900, now=1001.0)
    c, _ = store.create_join_token([], 10, now=1002.0)
    store.enroll_agent(a, sa, "ag-1", 7, 2e9, now=1003.0)
    assert store.revoke_join_token(b, now=1004.0) is True
    assert store.revoke_join_token(b) is True  # again: still revoked, at its first time
    assert store.revoke_join_token(a) is False  # it enrolled an agent: revoke the agent
    assert store.revoke_join_token("nope-nope") is None
    rows = {t["id"]: t for t in store.list_join_tokens(now=1100.0)}
    assert [rows[t]["state"] for t in (a, b, c)] == ["used", "revoked", "expired"]
    assert rows[a]["agent_id"] == "ag-1" and rows[a]["endpoints"] == ["web"] and rows[b]["revoked_at"] == 1004.0
    assert not any(s in repr(rows) for s in (sa, sb))
    assert store.get_join_token(b, now=1100.0) == rows[b] and store.get_join_token("nope-nope") is None
    with pytest.raises(AuthError, match="revoked"):
        store.redeem_join_token(b, sb, now=1005.0)
    with pytest.raises(AuthError, match="does not match"):  # the secret first: the state stays unsaid
        store.redeem_join_token(b, "x" * 43, now=1005.0)


def test_redeem_once(store):
    tid, secret = store.create_join_token(["web", "ssh"], 900, now=1000.0)
    assert store.redeem_join_token(tid, secret, now=1001.0) == ["web", "ssh"]
    with pytest.raises(AuthError, match="^join token already used$"):
        store.redeem_join_token(tid, secret, now=1002.0)


def test_redeem_expired(store):
    tid, secret = store.create_join_token([], 60, now=1000.0)
    with pytest.raises(AuthError, match="^join token expired$"):
        store.redeem_join_token(tid, secret, now=1060.0)
    assert store.redeem_join_token(tid, secret, now=1059.9) == []


def test_redeem_unknown(store):
    with pytest.raises(AuthError, match="^unknown join token$"):
        store.redeem_join_token("nosuchtoken0", "x" * 43)


def test_bad_secret_does_not_consume(store):
    tid, secret = store.create_join_token(["web"], 60, now=1000.0)
    with pytest.raises(AuthError, match="^join token secret does not match$"):
        store.redeem_join_token(tid, secret[:-1] + ("A" if secret[-1] != "A" else "B"), now=1001.0)
    assert store.redeem_join_token(tid, secret, now=1002.0) == ["web"]
    # Once spent or expired, a wrong secret still learns nothing more.
    with pytest.raises(AuthError, match="^join token secret does not match$"):
        store.redeem_join_token(tid, "wrong", now=5000.0)


def test_old_tokens_purged(store):
    old, secret = store.create_join_token([], 60, now=0.0)
    store.create_join_token([], 60, now=30 * 86400.0)
    with pytest.raises(AuthError, match="unknown"):
        store.redeem_join_token(old, secret, now=30 * 86400.0)


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_bad_ttl(store, ttl):
    with pytest.raises(ConfigError):
        store.create_join_token([], ttl)


def test_race_threads_separate_connections(db_path, store):
    tid, secret = store.create_join_token(["web"], 60)
    stores = [Store(db_path) for _ in range(8)]
    barrier = threading.Barrier(8)
    results = []

    def redeem(s):
        barrier.wait()
        try:
            results.append(s.redeem_join_token(tid, secret))
        except AuthError as exc:
            results.append(str(exc))

    threads = [threading.Thread(target=redeem, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for s in stores:
        s.close()
    assert sorted(map(str, results)) == ["['web']"] + ["join token already used"] * 7


def test_race_threads_shared_store(store):
    tid, secret = store.create_join_token(["web"], 60)
    barrier = threading.Barrier(8)
    results = []

    def redeem():
        barrier.wait()
        try:
            results.append(store.redeem_join_token(tid, secret))
        except AuthError:
            results.append(None)

    threads = [threading.Thread(target=redeem) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(["web"]) == 1 and results.count(None) == 7


def _redeem_in_process(path, tid, secret, barrier, queue):
    s = Store(path)
    try:
        barrier.wait(10)
        try:
            queue.put(s.redeem_join_token(tid, secret))
        except AuthError as exc:
            queue.put(str(exc))
    finally:
        s.close()


def test_race_processes(db_path, store):
    tid, secret = store.create_join_token(["web"], 60)
    ctx = multiprocessing.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_redeem_in_process, args=(str(db_path), tid, secret, barrier, queue))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=20) for _ in range(n)]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sorted(map(str, results)) == ["['web']"] + ["join token already used"] * (n - 1)


# -- agents -------------------------------------------------------------------


def test_agents_fields(store):
    assert store.get_agent("ag-1") is None and store.list_agents() == []
    store.add_agent("ag-1", ["web", "ssh"], BIG_SERIAL, 2_000_000_000.0)
    store.add_agent("ag-2", [], 7, 2_000_000_001.0)
    a = store.get_agent("ag-1")
    assert set(a) == {"id", "endpoints", "created_at", "revoked_at", "cert_serial",
                      "cert_not_after", "connected_since", "address", "bytes_in",
                      "bytes_out", "last_seen"}
    assert a["id"] == "ag-1" and a["endpoints"] == ["web", "ssh"]
    assert a["cert_serial"] == BIG_SERIAL and a["cert_not_after"] == 2_000_000_000.0
    assert isinstance(a["created_at"], float)
    assert a["revoked_at"] is None and a["connected_since"] is None and a["address"] is None
    assert a["bytes_in"] == 0 and a["bytes_out"] == 0 and a["last_seen"] is None
    assert [x["id"] for x in store.list_agents()] == ["ag-1", "ag-2"]
    with pytest.raises(ConfigError):
        store.add_agent("ag-1", [], 99, 0.0)


def test_status_does_not_bump_revision(store):
    store.add_agent("ag-1", ["web"], 1, 2e9)
    rev = store.revision()
    store.set_agent_statuses([("ag-1", 100.0, "10.0.0.5:51000", 2**40, 5)])
    assert store.revision() == rev
    a = store.get_agent("ag-1")
    assert (a["connected_since"], a["address"], a["bytes_in"], a["bytes_out"]) == (
        100.0, "10.0.0.5:51000", 2**40, 5)
    assert a["last_seen"] is not None
    store.set_agent_statuses([("nobody", None, None, 0, 0)])
    store.clear_all_status()
    a = store.get_agent("ag-1")
    assert a["connected_since"] is None and a["address"] is None
    assert store.revision() == rev


def test_revoke(store):
    r0 = store.revision()
    store.add_agent("ag-1", ["web"], BIG_SERIAL, 2e9)
    store.add_agent("ag-2", ["web"], 5, 2e9)
    r1 = store.revision()
    assert r1 > r0
    assert not store.is_revoked("ag-1", BIG_SERIAL)
    assert store.is_revoked("ag-1", 5)  # another agent's serial
    assert store.is_revoked("ag-1", 6)  # never issued
    assert store.is_revoked("ghost", BIG_SERIAL)

    store.update_agent_cert("ag-1", BIG_SERIAL + 1, 3e9)
    r2 = store.revision()
    assert r2 > r1
    assert store.get_agent("ag-1")["cert_serial"] == BIG_SERIAL + 1
    assert store.get_agent("ag-1")["cert_not_after"] == 3e9
    assert not store.is_revoked("ag-1", BIG_SERIAL)  # the old one, until it expires
    assert not store.is_revoked("ag-1", BIG_SERIAL + 1)

    assert store.revoke_agent("ag-1") is True
    r3 = store.revision()
    assert r3 > r2
    assert store.is_revoked("ag-1", BIG_SERIAL)
    assert store.is_revoked("ag-1", BIG_SERIAL + 1)
    assert not store.is_revoked("ag-2", 5)
    assert store.get_agent("ag-1")["revoked_at"] is not None
    assert store.revoke_agent("nobody") is False
    assert store.revision() == r3
    with pytest.raises(AuthError, match="revoked"):
        store.update_agent_cert("ag-1", 77, 3e9)
    with pytest.raises(ConfigError):
        store.update_agent_cert("nobody", 78, 3e9)


def test_revision_seen_by_other_connection(db_path, store):
    with Store(db_path) as admin:
        store.add_agent("ag-1", [], 1, 2e9)
        before = store.revision()
        admin.revoke_agent("ag-1")
        assert store.revision() > before
        assert store.is_revoked("ag-1", 1)
