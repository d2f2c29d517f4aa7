"""The control plane's embedded database (SQLite, stdlib ``sqlite3``).

Theory of operation
-------------------
One SQLite file in the node's data directory holds join tokens, agents and
the serials of every certificate issued to them. Two kinds of process open it
at once: the relay (long-lived) and ``relayd admin ...`` commands. So:

* WAL mode: readers never block the writer and vice versa; the relay's 0.5 s
  ``revision()`` poll costs one indexed read and takes no write lock.
* ``busy_timeout`` of 5 s: a writer waits for another process's short
  transaction instead of failing with "database is locked".
* Every method is one short transaction. Anything that reads and then writes
  starts with ``BEGIN IMMEDIATE``, which takes the write lock before the
  read, so the check and the update cannot interleave with another process
  (this is what makes join tokens single-use across processes).
* ``synchronous=FULL``: a redeemed token or a revocation must survive a power
  cut; losing it would re-open a door that was closed.
* The connection runs in autocommit mode (``isolation_level=None``) so the
  transactions are exactly the ones written here, not the ones the
  ``sqlite3`` module would open implicitly. A lock makes one ``Store`` safe
  to share between threads.

``revision()`` is a counter bumped in the same transaction as every change to
an agent or a revocation; the relay polls it and re-checks its live sessions
only when it moved. Connection status (``set_agent_statuses``) changes often
and does not bump it.

Join token secrets are stored only as SHA-256 hashes (they are 256-bit random
values, so a fast hash is enough) and compared in constant time; so is the
admin API key, in ``meta``, read at every check. Certificate
serials are 128-bit, beyond SQLite's 64-bit integers, so they are stored as
lowercase hex text.

The schema version lives in ``meta``; opening a database migrates it forward
inside one transaction and refuses a newer one.

``meta`` also records the pin of the CA whose agents the database holds.
``open_data_dir`` opens a relay's CA and database together and refuses a
pair that does not belong together (an empty or missing database next to an
existing CA, a database of another CA, a lost CA with agents enrolled): the
relay would otherwise start and tell every enrolled agent that it is unknown.

A statement or COMMIT that fails (disk full, I/O error, read-only file
system) rolls its transaction back and raises StorageError naming the
database; the connection stays usable. Enrolling spends the join token and
records the agent in one transaction, so a failure leaves the token valid.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import os
import pathlib
import secrets
import sqlite3
import threading
import time
from typing import Any

from relayd.control.ca import CERT_FILE, CertificateAuthority
from relayd.control.sas import MAX_RULES as MAX_SAS_RULES
from relayd.control.sas import SasRule
from relayd.errors import AuthError, ConfigError, DataDirError, RevokedError, StorageError

__all__ = ["DB_FILE", "SCHEMA_VERSION", "Store", "open_data_dir"]

SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 5000
#: Spent or expired join tokens are kept this long (so that a late attempt
#: gets "expired"/"already used" rather than "unknown"), then purged.
TOKEN_RETENTION = 7 * 86400.0

# Each entry migrates from version i to i + 1.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE join_tokens (
        id            TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        endpoints     TEXT NOT NULL,
        created_at    REAL NOT NULL,
        expires_at    REAL NOT NULL,
        used_at       REAL
    );
    CREATE TABLE agents (
        id              TEXT PRIMARY KEY,
        endpoints       TEXT NOT NULL,
        created_at      REAL NOT NULL,
        revoked_at      REAL,
        cert_serial     TEXT NOT NULL,
        cert_not_after  REAL NOT NULL,
        connected_since REAL,
        address         TEXT,
        bytes_in        INTEGER NOT NULL DEFAULT 0,
        bytes_out       INTEGER NOT NULL DEFAULT 0,
        last_seen       REAL
    );
    CREATE TABLE certificates (
        serial     TEXT PRIMARY KEY,
        agent_id   TEXT NOT NULL REFERENCES agents(id),
        not_after  REAL NOT NULL,
        issued_at  REAL NOT NULL,
        revoked_at REAL
    );
    CREATE INDEX certificates_agent ON certificates(agent_id);
    INSERT INTO meta(key, value) VALUES ('revision', 0);
    """,
    # 2: hybrid connections and their shared access rules (scope '' = the node)
    """
    CREATE TABLE hc_connections (
        path_key   TEXT PRIMARY KEY,
        path       TEXT NOT NULL,
        options    TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE hc_rules (
        scope         TEXT NOT NULL,
        name          TEXT NOT NULL,
        primary_key   TEXT NOT NULL,
        secondary_key TEXT NOT NULL,
        rights        TEXT NOT NULL,
        created_at    REAL NOT NULL,
        PRIMARY KEY (scope, name)
    );
    """,
    # 3: zero-trust users, devices, sessions, policy and revocations
    # (relayd.control.ztstore; ../shared/specs/zero-trust.md)
    """
    CREATE TABLE zt_users (
        provider      TEXT NOT NULL,
        username      TEXT NOT NULL,
        password_hash TEXT,
        totp_secret   TEXT,
        totp_step     INTEGER NOT NULL DEFAULT 0,
        email         TEXT,
        attrs         TEXT NOT NULL DEFAULT '{}',
        created_at    REAL NOT NULL,
        PRIMARY KEY (provider, username)
    );
    CREATE TABLE zt_groups (
        provider TEXT NOT NULL,
        username TEXT NOT NULL,
        grp      TEXT NOT NULL,
        PRIMARY KEY (provider, username, grp)
    );
    CREATE TABLE zt_devices (
        device_id      TEXT NOT NULL,
        provider       TEXT NOT NULL,
        username       TEXT NOT NULL,
        onboard_sha256 TEXT NOT NULL,
        hostname       TEXT,
        first_seen     REAL NOT NULL,
        last_seen      REAL NOT NULL,
        PRIMARY KEY (device_id, provider, username)
    );
    CREATE TABLE zt_sessions (
        sid         TEXT PRIMARY KEY,
        provider    TEXT NOT NULL,
        username    TEXT NOT NULL,
        device_id   TEXT NOT NULL,
        cert_sha256 TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        auth        TEXT NOT NULL,
        stepup      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE zt_policy (
        kind TEXT NOT NULL,
        id   TEXT NOT NULL,
        body TEXT NOT NULL,
        rev  INTEGER NOT NULL,
        PRIMARY KEY (kind, id)
    );
    CREATE TABLE zt_revocations (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        op            TEXT NOT NULL,
        selector      TEXT NOT NULL,
        types         TEXT NOT NULL,
        issued_before REAL NOT NULL,
        effective_at  REAL NOT NULL,
        expires_at    REAL NOT NULL,
        reason        TEXT NOT NULL,
        actor         TEXT NOT NULL
    );
    INSERT INTO meta(key, value) VALUES ('zt_pv', 0);
    """,
    # 4: a zero-trust user can be disabled (sign-in refused) and enabled again
    """
    ALTER TABLE zt_users ADD COLUMN disabled_at REAL;
    """,
    # 5: the device cloud (issue 13, ../shared/specs/device-cloud.md section 7):
    # provisioning OTPs (hashes only), devices (agents enrolled over EST: the
    # device id is the agent id; state, address and last_seen stay in agents),
    # the users of the device API (one per issuer and subject), owners and
    # shares, webhooks. The node a device's tunnel is on goes in agents.node.
    """
    CREATE TABLE dc_otps (
        id          TEXT PRIMARY KEY,
        otp_sha256  TEXT NOT NULL UNIQUE,
        device_name TEXT,
        labels      TEXT NOT NULL DEFAULT '{}',
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        used_at     REAL,
        revoked_at  REAL,
        device_id   TEXT,
        actor       TEXT NOT NULL
    );
    CREATE TABLE dc_users (
        id         TEXT PRIMARY KEY,
        iss        TEXT NOT NULL,
        sub        TEXT NOT NULL,
        email      TEXT,
        created_at REAL NOT NULL,
        UNIQUE (iss, sub)
    );
    CREATE TABLE dc_devices (
        id           TEXT PRIMARY KEY REFERENCES agents(id),
        name         TEXT NOT NULL,
        labels       TEXT NOT NULL DEFAULT '{}',
        owner        TEXT REFERENCES dc_users(id),
        claim_sha256 TEXT,
        claimed_at   REAL,
        created_at   REAL NOT NULL
    );
    CREATE TABLE dc_shares (
        device_id  TEXT NOT NULL REFERENCES dc_devices(id),
        user_id    TEXT NOT NULL REFERENCES dc_users(id),
        role       TEXT NOT NULL,
        granted_at REAL NOT NULL,
        PRIMARY KEY (device_id, user_id)
    );
    CREATE INDEX dc_shares_user ON dc_shares(user_id);
    CREATE TABLE dc_webhooks (
        id         TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL REFERENCES dc_users(id),
        url        TEXT NOT NULL,
        secret     TEXT NOT NULL,
        events     TEXT NOT NULL,
        device_ids TEXT,
        created_at REAL NOT NULL
    );
    ALTER TABLE agents ADD COLUMN node TEXT;
    """,
    # 6: join tokens can be revoked before use, and remember the agent they
    # enrolled (the admin API lists them: docs/api.md)
    """
    ALTER TABLE join_tokens ADD COLUMN revoked_at REAL;
    ALTER TABLE join_tokens ADD COLUMN agent_id TEXT;
    """,
]

#: The options of a hybrid connection kept in hc_connections.options (JSON).
_HC_OPTIONS = ("requires_client_auth", "websocket", "http", "response_timeout", "control_threshold",
               "max_listeners")

_TOKEN_SQL = "SELECT secret_sha256, endpoints, expires_at, used_at, revoked_at FROM join_tokens WHERE id = ?"
_TOKEN_COLUMNS = "id, endpoints, created_at, expires_at, used_at, revoked_at, agent_id"

_AGENT_COLUMNS = (
    "id, endpoints, created_at, revoked_at, cert_serial, cert_not_after,"
    " connected_since, address, bytes_in, bytes_out, last_seen"
)


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _serial_text(serial: int) -> str:
    if not isinstance(serial, int) or serial < 0:
        raise ConfigError("certificate serial must be a non-negative integer")
    return f"{serial:x}"


def _endpoints_json(endpoints: list[str]) -> str:
    if isinstance(endpoints, str) or not all(isinstance(e, str) for e in endpoints):
        raise ConfigError("endpoints must be a list of names")
    return json.dumps(list(endpoints))


def _usable_token(row: tuple | None, secret: str, now: float) -> list[str]:
    """The endpoints of a join-token row that ``secret`` may spend at
    ``now``; AuthError otherwise. The secret is checked first: without it,
    nobody learns whether the token is spent or expired."""
    if row is None:
        raise AuthError("unknown join token")
    stored_hash, endpoints, expires_at, used_at, revoked_at = row
    if not hmac.compare_digest(stored_hash, _hash_secret(secret)):
        raise AuthError("join token secret does not match")
    if used_at is not None:
        raise AuthError("join token already used")
    if revoked_at is not None:
        raise AuthError("join token revoked")
    if now >= expires_at:
        raise AuthError("join token expired")
    return json.loads(endpoints)


def _token_row(row: tuple, now: float) -> dict[str, Any]:
    d = dict(zip(("id", "endpoints", "created_at", "expires_at", "used_at", "revoked_at", "agent_id"), row))
    d["endpoints"] = json.loads(d["endpoints"])
    d["state"] = ("used" if d["used_at"] is not None else "revoked" if d["revoked_at"] is not None
                  else "expired" if d["expires_at"] <= now else "pending")
    return d


def _token_args(token_id: object, secret: object) -> None:
    if not isinstance(token_id, str) or not isinstance(secret, str):
        raise AuthError("unknown join token")


def _full_hint(path: str, message: str) -> str:
    """" (the file system is full)" when it is and the message does not say so
    (SQLite reports a full disk while creating its -shm file as an I/O error)."""
    if "full" in message:
        return ""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return ""
    return " (the file system is full)" if st.f_bavail == 0 else ""


class _NoSchema(DataDirError):
    """Opened without ``create``: the file holds no relayd tables."""


def _agent_row(row: tuple) -> dict[str, Any]:
    return {
        "id": row[0],
        "endpoints": json.loads(row[1]),
        "created_at": row[2],
        "revoked_at": row[3],
        "cert_serial": int(row[4], 16),
        "cert_not_after": row[5],
        "connected_since": row[6],
        "address": row[7],
        "bytes_in": row[8],
        "bytes_out": row[9],
        "last_seen": row[10],
    }


class Store:
    """The control-plane database in one SQLite file (thread and process safe)."""

    def __init__(self, path: os.PathLike | str, *, create: bool = True) -> None:
        """Open (``create``: and create if needed) the database at ``path``.

        Without ``create`` a file that does not exist or holds no relayd
        tables is refused (DataDirError) and left as it was found.
        """
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        # The file holds agent identities and token hashes: create it private.
        # SQLite gives its -wal and -shm files the same permissions.
        try:
            os.close(os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600))
        except OSError as exc:
            raise self._cannot_open(exc.strerror) from None
        try:
            self._db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._cannot_open(str(exc)) from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ConfigError(f"database {self.path} cannot use WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate(create)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise self._cannot_open(str(exc)) from None
        except StorageError as exc:
            self._db.close()
            raise self._cannot_open(exc.reason) from None
        except BaseException:
            self._db.close()
            raise

    def _cannot_open(self, reason: str) -> DataDirError:
        return DataDirError(f"cannot open database {self.path}: {reason}{_full_hint(self.path, reason)}")

    def _failed(self, doing: str, exc: sqlite3.Error) -> StorageError:
        reason = str(exc) or type(exc).__name__
        err = StorageError(f"database {self.path}: cannot {doing}: {reason}{_full_hint(self.path, reason)}")
        err.reason = reason
        return err

    # -- plumbing ---------------------------------------------------------

    def _migrate(self, create: bool) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = 0 if row is None else int(row[0])
            if version == 0 and not create:
                # Raised inside the transaction: the meta table goes too.
                raise _NoSchema(f"database {self.path} holds no relayd tables")
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"database {self.path} has schema version {version}, newer than"
                    f" this relayd supports ({SCHEMA_VERSION}); upgrade relayd"
                )
            for script in _MIGRATIONS[version:]:
                # executescript() would COMMIT first; run statement by statement
                # so that a migration is all or nothing.
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (SCHEMA_VERSION,),
            )

    class _Txn:
        """``with store._write() as db``: BEGIN IMMEDIATE ... COMMIT/ROLLBACK."""

        def __init__(self, store: Store) -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException as exc:
                self.store._lock.release()
                if isinstance(exc, sqlite3.Error):
                    raise self.store._failed("write", exc) from None
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            db = self.store._db
            try:
                if exc_type is None:
                    try:
                        db.execute("COMMIT")
                        return
                    except sqlite3.Error as commit_exc:
                        exc = commit_exc
                # SQLite may have rolled back already (a full disk does);
                # a busy COMMIT leaves the transaction open.
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(exc, sqlite3.Error):
                    raise self.store._failed("write", exc) from None
            finally:
                self.store._lock.release()

    def _write(self) -> Store._Txn:
        return Store._Txn(self)

    #: For the stores of other parts over the same database (relayd.control.ztstore).
    transaction = _write

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._failed("read", exc) from None

    query = _read

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- join tokens ------------------------------------------------------

    def create_join_token(
        self, endpoints: list[str], ttl_seconds: float, *, now: float | None = None
    ) -> tuple[str, str]:
        """Record a new single-use join token; returns ``(token_id, secret)``."""
        if not (isinstance(ttl_seconds, (int, float)) and math.isfinite(ttl_seconds)
                and ttl_seconds > 0):
            raise ConfigError("join token lifetime must be a positive number of seconds")
        endpoints_json = _endpoints_json(endpoints)
        now = time.time() if now is None else now
        secret = secrets.token_urlsafe(32)
        with self._write() as db:
            db.execute("DELETE FROM join_tokens WHERE expires_at < ?", (now - TOKEN_RETENTION,))
            while True:
                token_id = secrets.token_urlsafe(9)  # 12 characters
                try:
                    db.execute(
                        "INSERT INTO join_tokens"
                        " (id, secret_sha256, endpoints, created_at, expires_at, used_at)"
                        " VALUES (?, ?, ?, ?, ?, NULL)",
                        (token_id, _hash_secret(secret), endpoints_json, now, now + ttl_seconds),
                    )
                    break
                except sqlite3.IntegrityError:
                    continue  # 72-bit id collision: astronomically rare, retry
        return token_id, secret

    def check_join_token(self, token_id: str, secret: str, *, now: float | None = None) -> list[str]:
        """The endpoints of a join token that could be redeemed now, without
        spending it; AuthError as ``redeem_join_token`` would raise it."""
        _token_args(token_id, secret)
        rows = self._read(_TOKEN_SQL, (token_id,))
        return _usable_token(rows[0] if rows else None, secret, time.time() if now is None else now)

    def list_join_tokens(self, *, now: float | None = None) -> list[dict[str, Any]]:
        """Every join token kept (spent and dead ones for TOKEN_RETENTION),
        oldest first; never a secret or its hash. Keys: id, endpoints,
        created_at, expires_at, used_at, revoked_at, agent_id (the agent it
        enrolled) and state (pending, used, expired, revoked)."""
        now = time.time() if now is None else now
        rows = self._read(f"SELECT {_TOKEN_COLUMNS} FROM join_tokens ORDER BY created_at, id")
        return [_token_row(r, now) for r in rows]

    def get_join_token(self, token_id: str, *, now: float | None = None) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {_TOKEN_COLUMNS} FROM join_tokens WHERE id = ?", (token_id,))
        return _token_row(rows[0], time.time() if now is None else now) if rows else None

    def revoke_join_token(self, token_id: str, *, now: float | None = None) -> bool | None:
        """Refuse a join token from now on: True (revoked now or before),
        False if it enrolled an agent already (revoke the agent), None if
        unknown."""
        now = time.time() if now is None else now
        with self._write() as db:
            row = db.execute("SELECT used_at FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
            if row is None:
                return None
            if row[0] is not None:
                return False
            db.execute("UPDATE join_tokens SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?", (now, token_id))
        return True

    def redeem_join_token(self, token_id: str, secret: str, *, now: float | None = None) -> list[str]:
        """Spend a join token; returns its endpoints, AuthError if refused.

        Exactly one of any number of concurrent redeemers (threads or
        processes) succeeds. A wrong secret does not spend the token and its
        error says nothing about the token's state.
        """
        _token_args(token_id, secret)
        with self._write() as db:
            return self._spend_token(db, token_id, secret, time.time() if now is None else now)

    @staticmethod
    def _spend_token(db: sqlite3.Connection, token_id: str, secret: str, now: float) -> list[str]:
        endpoints = _usable_token(db.execute(_TOKEN_SQL, (token_id,)).fetchone(), secret, now)
        cur = db.execute(
            "UPDATE join_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL",
            (now, token_id),
        )
        if cur.rowcount != 1:
            raise AuthError("join token already used")
        return endpoints

    # -- agents -----------------------------------------------------------

    def enroll_agent(
        self,
        token_id: str,
        secret: str,
        agent_id: str,
        cert_serial: int,
        cert_not_after: float,
        *,
        now: float | None = None,
    ) -> list[str]:
        """Spend a join token and record the agent it enrolls, in one
        transaction: if recording fails, the token stays valid. Returns the
        token's endpoints; AuthError as ``redeem_join_token``."""
        _token_args(token_id, secret)
        serial = _serial_text(cert_serial)
        now = time.time() if now is None else now
        with self._write() as db:
            endpoints = self._spend_token(db, token_id, secret, now)
            self._insert_agent(db, agent_id, _endpoints_json(endpoints), serial, cert_not_after, now)
            db.execute("UPDATE join_tokens SET agent_id = ? WHERE id = ?", (agent_id, token_id))
            self._bump(db)
        return endpoints

    def add_agent(
        self, agent_id: str, endpoints: list[str], cert_serial: int, cert_not_after: float
    ) -> None:
        """Record a newly enrolled agent and its first certificate."""
        endpoints_json = _endpoints_json(endpoints)
        serial = _serial_text(cert_serial)
        with self._write() as db:
            self._insert_agent(db, agent_id, endpoints_json, serial, cert_not_after, time.time())
            self._bump(db)

    @staticmethod
    def _insert_agent(db: sqlite3.Connection, agent_id: str, endpoints_json: str, serial: str,
                      cert_not_after: float, now: float) -> None:
        try:
            db.execute(
                f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES"
                " (?, ?, ?, NULL, ?, ?, NULL, NULL, 0, 0, NULL)",
                (agent_id, endpoints_json, now, serial, cert_not_after),
            )
            db.execute(
                "INSERT INTO certificates (serial, agent_id, not_after, issued_at)"
                " VALUES (?, ?, ?, ?)",
                (serial, agent_id, cert_not_after, now),
            )
        except sqlite3.IntegrityError:
            raise ConfigError(f"agent {agent_id} or its certificate serial already exists") from None

    def update_agent_cert(self, agent_id: str, cert_serial: int, cert_not_after: float) -> None:
        """Record a renewed certificate; earlier ones stay valid until they expire.

        ConfigError for an unknown agent, AuthError for a revoked one.
        """
        serial = _serial_text(cert_serial)
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT revoked_at FROM agents WHERE id = ?", (agent_id,)).fetchone()
            if row is None:
                raise ConfigError(f"unknown agent {agent_id}")
            if row[0] is not None:
                raise RevokedError(f"agent {agent_id} is revoked")
            try:
                db.execute(
                    "INSERT INTO certificates (serial, agent_id, not_after, issued_at)"
                    " VALUES (?, ?, ?, ?)",
                    (serial, agent_id, cert_not_after, now),
                )
            except sqlite3.IntegrityError:
                raise ConfigError("certificate serial already recorded") from None
            db.execute(
                "UPDATE agents SET cert_serial = ?, cert_not_after = ? WHERE id = ?",
                (serial, cert_not_after, agent_id),
            )
            self._bump(db)

    def get_agent(self, agent_id: str) -> dict[str, Any] | None:
        """One agent as a dict (see ``list_agents``), or None."""
        rows = self._read(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE id = ?", (agent_id,))
        return _agent_row(rows[0]) if rows else None

    def list_agents(self) -> list[dict[str, Any]]:
        """Every agent, oldest first.

        Keys: id, endpoints, created_at, revoked_at, cert_serial (current),
        cert_not_after, connected_since, address, bytes_in, bytes_out,
        last_seen.
        """
        rows = self._read(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY created_at, id")
        return [_agent_row(r) for r in rows]

    def revoke_agent(self, agent_id: str) -> bool:
        """Revoke an agent and every certificate issued to it; False if unknown."""
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE agents SET revoked_at = coalesce(revoked_at, ?) WHERE id = ?",
                (now, agent_id),
            )
            if cur.rowcount == 0:
                return False
            db.execute(
                "UPDATE certificates SET revoked_at = ?"
                " WHERE agent_id = ? AND revoked_at IS NULL",
                (now, agent_id),
            )
            self._bump(db)
        return True

    def register_device(self, agent_id: str, name: str | None = None, labels: dict | None = None) -> None:
        """Make an enrolled agent a device (a dc_devices row: relayd.control.devices):
        its tunnel then publishes device events and gets a claim code.
        ConfigError if the agent is unknown or a device already."""
        if labels is not None and (not isinstance(labels, dict)
                                   or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())):
            raise ConfigError("device labels map names to strings")
        with self._write() as db:
            if db.execute("SELECT 1 FROM agents WHERE id = ?", (agent_id,)).fetchone() is None:
                raise ConfigError(f"unknown agent {agent_id}")
            try:
                db.execute("INSERT INTO dc_devices (id, name, labels, created_at) VALUES (?, ?, ?, ?)",
                           (agent_id, name or agent_id, json.dumps(labels or {}), time.time()))
            except sqlite3.IntegrityError:
                raise ConfigError(f"agent {agent_id} is a device already") from None

    def is_revoked(self, agent_id: str, cert_serial: int) -> bool:
        """Whether a certificate must be refused.

        True if the agent is unknown or revoked, or the serial is revoked or
        was never recorded as issued to this agent (deny by default: a
        certificate the database does not know is not trusted).
        """
        if not isinstance(cert_serial, int) or cert_serial < 0:
            return True
        rows = self._read(
            "SELECT a.revoked_at, c.revoked_at FROM agents a"
            " JOIN certificates c ON c.agent_id = a.id"
            " WHERE a.id = ? AND c.serial = ?",
            (agent_id, _serial_text(cert_serial)),
        )
        return not rows or rows[0][0] is not None or rows[0][1] is not None

    def revision(self) -> int:
        """A counter that moves whenever an agent or revocation changes."""
        return int(self._read("SELECT value FROM meta WHERE key = 'revision'")[0][0])

    def agent_count(self) -> int:
        """How many agents were ever enrolled (revoked ones included)."""
        return int(self._read("SELECT count(*) FROM agents")[0][0])

    # -- the CA this database belongs to ------------------------------------

    def ca_pin(self) -> str | None:
        """The pin of the CA recorded with ``set_ca_pin``, or None."""
        rows = self._read("SELECT value FROM meta WHERE key = 'ca_pin'")
        return rows[0][0] if rows else None

    def set_ca_pin(self, pin: str) -> None:
        """Record the pin of the CA that enrolls this database's agents."""
        with self._write() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('ca_pin', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (pin,),
            )

    # -- the admin API key (relayd.control.api) -------------------------------

    def has_admin_key(self) -> bool:
        return bool(self._read("SELECT 1 FROM meta WHERE key = 'admin_api_sha256'"))

    def set_admin_key(self, key: str, *, only_if_absent: bool = False) -> bool:
        """Make ``key`` the admin API key (only its SHA-256 is kept): the
        previous one stops working at once. False when ``only_if_absent``
        and there is one already."""
        with self._write() as db:
            if only_if_absent and db.execute("SELECT 1 FROM meta WHERE key = 'admin_api_sha256'").fetchone():
                return False
            db.execute("INSERT INTO meta(key, value) VALUES ('admin_api_sha256', ?)"
                       " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (_hash_secret(key),))
            return True

    def check_admin_key(self, key: str) -> bool:
        """Whether ``key`` is the admin API key now (read at every call, so
        a rotation by another process counts at once; constant time)."""
        rows = self._read("SELECT value FROM meta WHERE key = 'admin_api_sha256'")
        if not rows or not isinstance(key, str) or len(key) > 256:
            return False
        return hmac.compare_digest(rows[0][0], _hash_secret(key))

    # -- live status --------------------------------------------------------

    def set_agent_statuses(self, rows: list[tuple[str, float | None, str | None, int, int]]) -> None:
        """Record agents' connection status in one transaction (one fsync):
        rows of (agent_id, connected_since, address, bytes_in, bytes_out).
        Does not bump ``revision``."""
        if not rows:
            return
        now = time.time()
        with self._write() as db:
            db.executemany(
                "UPDATE agents SET connected_since = ?, address = ?, bytes_in = ?,"
                " bytes_out = ?, last_seen = ? WHERE id = ?",
                [(since, addr, bin_, bout, now, aid) for aid, since, addr, bin_, bout in rows],
            )

    def clear_all_status(self) -> None:
        """Mark every agent disconnected (the relay calls this when it starts)."""
        with self._write() as db:
            db.execute(
                "UPDATE agents SET connected_since = NULL, address = NULL"
                " WHERE connected_since IS NOT NULL OR address IS NOT NULL"
            )

    def connected_cert_expiry(self) -> dict[str, float]:
        """The earliest ``cert_not_after`` (the current certificate's, so
        renewals count) among connected, unrevoked agents: ``{"agent": t,
        "device": t}``, devices being agents with a dc_devices row; a kind
        with none connected is left out."""
        rows = self._read(
            "SELECT d.id IS NOT NULL, MIN(a.cert_not_after) FROM agents a LEFT JOIN dc_devices d ON d.id = a.id"
            " WHERE a.connected_since IS NOT NULL AND a.revoked_at IS NULL GROUP BY 1")
        return {("device" if device else "agent"): float(t) for device, t in rows}

    # -- hybrid connections (relayd.control.hybrid) -------------------------

    def hc_create(self, hc, *, now: float | None = None) -> None:
        """Record a hybrid connection (its options; its rules with
        hc_rule_add); ConfigError if the path is taken."""
        options = {k: getattr(hc, k) for k in _HC_OPTIONS}
        with self._write() as db:
            if db.execute("SELECT 1 FROM hc_connections WHERE path_key = ?", (hc.key,)).fetchone():
                raise ConfigError(f"hybrid connection {hc.path!r} already exists")
            db.execute("INSERT INTO hc_connections(path_key, path, options, created_at) VALUES (?, ?, ?, ?)",
                       (hc.key, hc.path, json.dumps(options), time.time() if now is None else now))
            for rule in hc.rules:
                self._insert_rule(db, hc.key, rule, now)
            self._bump(db)

    def hc_delete(self, path: str) -> bool:
        """Remove a hybrid connection and its rules; False if there was none."""
        key = path.strip("/").lower()
        with self._write() as db:
            gone = db.execute("DELETE FROM hc_connections WHERE path_key = ?", (key,)).rowcount
            db.execute("DELETE FROM hc_rules WHERE scope = ?", (key,))
            if gone:
                self._bump(db)
        return bool(gone)

    def hc_catalog(self):
        """Every hybrid connection and rule of the data directory, as a
        relayd.control.hybrid.Catalog."""
        from relayd.control.hybrid import Catalog, HybridConnection

        rules: dict[str, list] = {}
        for scope, name, primary, secondary, rights in self._read(
                "SELECT scope, name, primary_key, secondary_key, rights FROM hc_rules ORDER BY created_at, name"):
            rules.setdefault(scope, []).append(SasRule(name, primary, secondary, frozenset(json.loads(rights))))
        connections = [HybridConnection(path, rules=tuple(rules.get(key, ())), **json.loads(options))
                       for key, path, options in self._read(
                           "SELECT path_key, path, options FROM hc_connections ORDER BY path_key")]
        return Catalog.of(connections, rules.get("", ()))

    def hc_rule_add(self, scope: str, rule, *, now: float | None = None) -> None:
        """Add a shared access rule to a hybrid connection (``scope`` its
        path) or to the node (``scope`` ""); at most MAX_RULES per scope."""
        key = self._hc_scope(scope)
        with self._write() as db:
            if key and not db.execute("SELECT 1 FROM hc_connections WHERE path_key = ?", (key,)).fetchone():
                raise ConfigError(f"no hybrid connection {scope!r}")
            if db.execute("SELECT 1 FROM hc_rules WHERE scope = ? AND name = ?", (key, rule.name)).fetchone():
                raise ConfigError(f"a rule {rule.name!r} exists already there")
            (n,) = db.execute("SELECT COUNT(*) FROM hc_rules WHERE scope = ?", (key,)).fetchone()
            if n >= MAX_SAS_RULES:
                raise ConfigError(f"at most {MAX_SAS_RULES} shared access rules per scope")
            self._insert_rule(db, key, rule, now)
            self._bump(db)

    def hc_rule_rotate(self, scope: str, name: str, new_key: str) -> SasRule:
        """The rule's primary key becomes its secondary (tokens signed with
        it stay good) and ``new_key`` its primary; the rule as it is now."""
        key = self._hc_scope(scope)
        with self._write() as db:
            row = db.execute("SELECT primary_key, rights FROM hc_rules WHERE scope = ? AND name = ?",
                             (key, name)).fetchone()
            if row is None:
                raise ConfigError(f"no rule {name!r} there")
            rule = SasRule(name, new_key, row[0], frozenset(json.loads(row[1])))
            db.execute("UPDATE hc_rules SET primary_key = ?, secondary_key = ? WHERE scope = ? AND name = ?",
                       (new_key, row[0], key, name))
            self._bump(db)
        return rule

    def hc_rule_remove(self, scope: str, name: str) -> bool:
        key = self._hc_scope(scope)
        with self._write() as db:
            gone = db.execute("DELETE FROM hc_rules WHERE scope = ? AND name = ?", (key, name)).rowcount
            if gone:
                self._bump(db)
        return bool(gone)

    @staticmethod
    def _hc_scope(scope: str) -> str:
        return scope.strip("/").lower() if scope else ""

    @staticmethod
    def _insert_rule(db: sqlite3.Connection, scope: str, rule, now: float | None) -> None:
        db.execute("INSERT INTO hc_rules(scope, name, primary_key, secondary_key, rights, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)", (scope, rule.name, rule.primary_key, rule.secondary_key,
                                                  json.dumps(sorted(rule.rights)), time.time() if now is None else now))


# -- the relay's data directory ---------------------------------------------------

#: The database's file name in a relay's data directory; the CA lives in ``ca/``.
DB_FILE = "relayd.db"
CA_DIR = "ca"


def _short_pin(pin: str) -> str:
    return pin[:23] + "..." if len(pin) > 23 else pin


def _inconsistent(d: pathlib.Path, what: str, restore: str) -> DataDirError:
    return DataDirError(
        f"data directory {d} is inconsistent: {what}; starting like this would refuse every"
        f" enrolled agent. To recover, {restore}; or start over: move {d} away and start again"
        f" (every agent must then enroll again with a new join token)"
    )


def _make_private_dir(d: pathlib.Path) -> None:
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"data directory {d} exists and is not a directory") from None
    except NotADirectoryError:
        raise DataDirError(f"cannot create data directory {d}: a parent is not a directory") from None
    except OSError as exc:
        raise DataDirError(f"cannot create data directory {d}: {exc.strerror}") from None
    try:
        os.chmod(d, 0o700)
    except OSError as exc:
        raise DataDirError(f"cannot use data directory {d}: {exc.strerror}") from None


def open_data_dir(directory: os.PathLike | str, *, create: bool) -> tuple[CertificateAuthority, Store]:
    """Open a relay's data directory: ``(ca, store)``, checked to belong together.

    With ``create`` (``relayd serve``) the directory, database and CA are
    made on first use, the database first: a crash in between then leaves a
    database without a CA, which is completed at the next start. Without it
    (``relayd admin``) only an existing relay directory is opened. A database
    from before pins were recorded gets the current CA's pin. DataDirError,
    with what to do, when the directory cannot be used or its parts do not
    belong together.
    """
    d = pathlib.Path(directory)
    ca_cert = d / CA_DIR / CERT_FILE
    db_path = d / DB_FILE
    if create:
        _make_private_dir(d)
    elif not ca_cert.is_file():
        raise DataDirError(f"{d} is not a relay data directory: start `relayd serve --data {d}` once first")
    has_ca = ca_cert.is_file()
    backup = f"restore {db_path} from a backup"
    if has_ca:
        try:
            size = db_path.stat().st_size
        except FileNotFoundError:
            raise _inconsistent(d, f"{db_path} is missing but the CA {ca_cert} exists", backup) from None
        except OSError as exc:
            raise DataDirError(f"cannot open database {db_path}: {exc.strerror}") from None
        if size == 0:
            raise _inconsistent(d, f"{db_path} is empty (0 bytes) but the CA {ca_cert} exists", backup)
    try:
        store = Store(db_path, create=not has_ca)
    except _NoSchema:
        raise _inconsistent(d, f"{db_path} holds no relayd tables but the CA {ca_cert} exists", backup) from None
    try:
        pin = store.ca_pin()
        if not has_ca and (n := store.agent_count()):
            raise _inconsistent(
                d, f"{ca_cert} is missing but {db_path} records {n} agent{'s' if n > 1 else ''}"
                f" enrolled by {'the CA ' + _short_pin(pin) if pin else 'that CA'}",
                f"restore {d / CA_DIR} from a backup")
        ca = CertificateAuthority.load_or_create(d / CA_DIR)
        if pin is None or not has_ca:
            store.set_ca_pin(ca.pin)
        elif pin != ca.pin:
            raise _inconsistent(
                d, f"{db_path} belongs to another CA ({_short_pin(pin)}) than {ca_cert} ({_short_pin(ca.pin)})",
                f"restore the {DB_FILE} that belongs to this CA (or the {CA_DIR}/ that belongs to this"
                f" {DB_FILE}) from a backup")
    except OSError as exc:
        store.close()
        raise DataDirError(f"data directory {d}: {exc.filename or d}: {exc.strerror}") from None
    except BaseException:
        store.close()
        raise
    return ca, store


class AsyncStore:
    """The store as the event loop uses it: every call runs in a worker
    thread, never on the loop (a write fsyncs, and a loop stalled on the
    disk stalls every link). ``await db("is_revoked", agent, serial)``, or
    ``await db.run(fn)`` for several calls in one thread hop, ``fn(store)``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, name: str, *args):
        return await asyncio.to_thread(getattr(self.store, name), *args)

    async def run(self, fn):
        return await asyncio.to_thread(fn, self.store)
