"""The relay's data directory as a whole: the database must belong to the CA
next to it, and the store's failures come out as values of the hierarchy,
never leaving a join token spent for an agent that was not recorded."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from relayd.control.store import Store, open_data_dir
from relayd.errors import AuthError, ConfigError, DataDirError, StorageError

SERIAL = (1 << 127) | 99


def _relay_dir(path, agents=0):
    """A data directory as `relayd serve` leaves it, with ``agents`` enrolled."""
    ca, store = open_data_dir(path, create=True)
    for i in range(agents):
        store.add_agent(f"ag-{i}", [], SERIAL + 2 * i, 2e9)
    store.close()
    return ca


def _recovery(msg, d):
    # Every refusal says what to do: restore from backup, or start over.
    assert "backup" in msg and f"move {d} away" in msg and "enroll again" in msg, msg


def _pin_in_db(d):
    raw = sqlite3.connect(d / "relayd.db")
    try:
        row = raw.execute("SELECT value FROM meta WHERE key = 'ca_pin'").fetchone()
    finally:
        raw.close()
    return row and row[0]


def _drop_db(d):
    for p in d.glob("relayd.db*"):
        p.unlink()


# -- consistency ----------------------------------------------------------------


def test_fresh_directory_gets_ca_and_database_with_pin(tmp_path):
    d = tmp_path / "relay"
    ca = _relay_dir(d)
    assert (d / "ca" / "ca.crt").exists() and (d / "relayd.db").exists()
    assert (d.stat().st_mode & 0o777) == 0o700
    assert _pin_in_db(d) == ca.pin
    # Later opens, by the relay and by admin commands, accept it.
    for create in (True, False):
        ca2, store = open_data_dir(d, create=create)
        store.close()
        assert ca2.pin == ca.pin


@pytest.mark.parametrize("how", ["empty", "missing", "no tables"])
def test_database_lost_next_to_existing_ca_refused(tmp_path, how):
    d = tmp_path / "relay"
    _relay_dir(d, agents=2)
    _drop_db(d)
    if how == "empty":
        (d / "relayd.db").write_bytes(b"")
    elif how == "no tables":
        raw = sqlite3.connect(d / "relayd.db")  # a database, but not relayd's
        raw.execute("CREATE TABLE other (x)")
        raw.commit()
        raw.close()
    for create in (True, False):
        with pytest.raises(DataDirError) as info:
            open_data_dir(d, create=create)
        msg = str(info.value)
        assert "relayd.db" in msg and "CA" in msg and "\n" not in msg
        _recovery(msg, d)
    # Refusing wrote nothing: a second attempt is refused the same way
    # (it must not find a fresh schema and accept it as an old database).
    if how == "missing":
        assert not (d / "relayd.db").exists()
    elif how == "empty":
        assert (d / "relayd.db").stat().st_size == 0
    with pytest.raises(DataDirError):
        open_data_dir(d, create=True)


def test_database_of_another_ca_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ca_a = _relay_dir(a, agents=1)
    ca_b = _relay_dir(b, agents=1)
    _drop_db(a)
    shutil.copy(b / "relayd.db", a / "relayd.db")
    with pytest.raises(DataDirError) as info:
        open_data_dir(a, create=True)
    msg = str(info.value)
    assert "another CA" in msg and ca_a.pin[:20] in msg and ca_b.pin[:20] in msg
    _recovery(msg, a)


def test_database_from_before_pins_upgraded_silently(tmp_path):
    d = tmp_path / "relay"
    ca = _relay_dir(d, agents=3)
    raw = sqlite3.connect(d / "relayd.db")
    with raw:
        raw.execute("DELETE FROM meta WHERE key = 'ca_pin'")
    raw.close()
    assert _pin_in_db(d) is None
    ca2, store = open_data_dir(d, create=False)
    assert len(store.list_agents()) == 3
    store.close()
    assert ca2.pin == ca.pin and _pin_in_db(d) == ca.pin


def test_ca_lost_with_enrolled_agents_refused(tmp_path):
    d = tmp_path / "relay"
    _relay_dir(d, agents=1)
    shutil.rmtree(d / "ca")
    with pytest.raises(DataDirError) as info:
        open_data_dir(d, create=True)
    msg = str(info.value)
    assert "ca.crt" in msg and "1 agent" in msg
    _recovery(msg, d)
    assert not (d / "ca" / "ca.crt").exists()  # no new CA was made up


def test_ca_lost_without_agents_makes_a_new_one(tmp_path):
    d = tmp_path / "relay"
    old = _relay_dir(d)
    shutil.rmtree(d / "ca")
    ca, store = open_data_dir(d, create=True)
    store.close()
    assert ca.pin != old.pin and _pin_in_db(d) == ca.pin


def test_data_dir_is_a_file(tmp_path):
    f = tmp_path / "relay"
    f.write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        open_data_dir(f, create=True)
    with pytest.raises(DataDirError, match="not a directory"):
        open_data_dir(tmp_path / "relay" / "sub", create=True)


def test_admin_does_not_create(tmp_path):
    with pytest.raises(DataDirError, match="relayd serve"):
        open_data_dir(tmp_path / "nope", create=False)
    assert not (tmp_path / "nope").exists()


# -- the store's failures -------------------------------------------------------------


def _break_inserts(db_path, table):
    """Make every INSERT into ``table`` fail the way a broken disk would make
    it fail: an error in the middle of a transaction (the trigger calls a
    function that does not exist, so SQLite reports an OperationalError)."""
    raw = sqlite3.connect(db_path)
    raw.execute(f"CREATE TRIGGER broken_{table} BEFORE INSERT ON {table}"
                " BEGIN SELECT relayd_test_no_such_function(); END")
    raw.close()


def _fix_inserts(db_path, table):
    raw = sqlite3.connect(db_path)
    raw.execute(f"DROP TRIGGER broken_{table}")
    raw.close()


def test_enroll_is_one_transaction_token_survives_a_failure(tmp_path):
    d = tmp_path / "relay"
    _, store = open_data_dir(d, create=True)
    try:
        tid, secret = store.create_join_token(["web"], 60)
        assert store.check_join_token(tid, secret) == ["web"]  # checking spends nothing
        _break_inserts(d / "relayd.db", "agents")
        with pytest.raises(StorageError) as info:
            store.enroll_agent(tid, secret, "ag-1", SERIAL, 2e9)
        assert secret not in str(info.value) and "relayd.db" in str(info.value)
        # The token is not spent, and no half-recorded agent remains.
        assert store.list_agents() == []
        assert store.check_join_token(tid, secret) == ["web"]
        _fix_inserts(d / "relayd.db", "agents")
        assert store.enroll_agent(tid, secret, "ag-1", SERIAL, 2e9) == ["web"]
        assert not store.is_revoked("ag-1", SERIAL)
        with pytest.raises(AuthError, match="already used"):
            store.enroll_agent(tid, secret, "ag-2", SERIAL + 2, 2e9)
        with pytest.raises(AuthError, match="already used"):
            store.check_join_token(tid, secret)
        # A duplicate agent id rolls the spend back too.
        tid2, secret2 = store.create_join_token([], 60)
        with pytest.raises(ConfigError):
            store.enroll_agent(tid2, secret2, "ag-1", SERIAL + 4, 2e9)
        assert store.check_join_token(tid2, secret2) == []
    finally:
        store.close()


def test_check_join_token_refusals(tmp_path):
    with Store(tmp_path / "relayd.db") as store:
        tid, secret = store.create_join_token([], 0.01, now=1000.0)
        with pytest.raises(AuthError, match="does not match"):
            store.check_join_token(tid, "x" * 43)
        with pytest.raises(AuthError, match="expired"):
            store.check_join_token(tid, secret)
        with pytest.raises(AuthError, match="unknown"):
            store.check_join_token("nope", secret)


def test_failed_write_is_a_storage_error_and_the_store_goes_on(tmp_path):
    path = tmp_path / "relayd.db"
    with Store(path) as store:
        _break_inserts(path, "join_tokens")
        with pytest.raises(StorageError, match="cannot write"):
            store.create_join_token([], 60)
        _fix_inserts(path, "join_tokens")
        tid, secret = store.create_join_token([], 60)
        # The failed write left no transaction open: the next one is committed, another connection sees it.
        with Store(path) as other:
            assert other.redeem_join_token(tid, secret) == []
