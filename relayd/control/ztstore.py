"""The zero-trust tables of the control plane's database (schema 3 of
relayd.control.store): users and groups, registered devices, sessions, the
versioned policy and the revocation log.

Same rules as the store: one short transaction per call, ``BEGIN
IMMEDIATE`` where a check and a change must not interleave with another
process (a TOTP step spent once across processes, a session refused once
killed), secrets kept as hashes. Every policy change bumps ``zt_pv`` in the
same transaction, so a token's ``pv`` says which policy made it.

The revocation log is append-only with an increasing ``seq``: the relay's
gateways apply entries in order and fetch what they missed with
``revocations(since)``; `relayd admin revoke` from another process appends
to the same log and the relay picks it up at its next poll.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from relayd.control.policy import KINDS, Conflict, Policy, PolicyError, check
from relayd.control.store import Store
from relayd.errors import AuthError

LOCAL = "local"


def _h(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_groups(groups) -> list[str]:
    """Group names: 1-128 characters, no control characters."""
    if isinstance(groups, str) or not all(isinstance(g, str) and 0 < len(g) <= 128 and g.isprintable()
                                          for g in groups):
        raise PolicyError("a group name is 1-128 characters, without control characters")
    return list(groups)


class ZtStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- users ---------------------------------------------------------------

    def add_user(self, provider: str, username: str, *, password_hash: str | None = None,
                 totp_secret: str | None = None, email: str | None = None, groups=(), attrs: dict | None = None,
                 now: float | None = None) -> None:
        groups = check_groups(groups)
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM zt_users WHERE provider = ? AND username = ?",
                          (provider, username)).fetchone():
                raise Conflict(f"user {username!r} ({provider}) exists already")
            db.execute("INSERT INTO zt_users(provider, username, password_hash, totp_secret, email, attrs, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (provider, username, password_hash, totp_secret, email, json.dumps(attrs or {}),
                        now or time.time()))
            for g in groups:
                db.execute("INSERT OR IGNORE INTO zt_groups VALUES (?, ?, ?)", (provider, username, g))

    def ensure_user(self, provider: str, username: str, email: str | None, attrs: dict) -> None:
        """An external provider's user, made on first sign-in; its attributes
        are refreshed at every one."""
        with self.store.transaction() as db:
            db.execute("INSERT INTO zt_users(provider, username, email, attrs, created_at) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT(provider, username) DO UPDATE SET email = excluded.email,"
                       " attrs = excluded.attrs", (provider, username, email, json.dumps(attrs), time.time()))

    def get_user(self, provider: str, username: str) -> dict | None:
        rows = self.store.query("SELECT password_hash, totp_secret, totp_step, email, attrs, created_at, disabled_at"
                                " FROM zt_users WHERE provider = ? AND username = ?", (provider, username))
        if not rows:
            return None
        r = rows[0]
        groups = [g for (g,) in self.store.query("SELECT grp FROM zt_groups WHERE provider = ? AND username = ?"
                                                 " ORDER BY grp", (provider, username))]
        return {"provider": provider, "username": username, "password_hash": r[0], "totp_secret": r[1],
                "totp_step": r[2], "email": r[3], "attrs": json.loads(r[4]), "created_at": r[5], "groups": groups,
                "disabled_at": r[6]}

    def list_users(self) -> list[dict]:
        out = []
        for p, u in self.store.query("SELECT provider, username FROM zt_users ORDER BY provider, username"):
            user = self.get_user(p, u)
            user.pop("password_hash")
            user["totp"] = user.pop("totp_secret") is not None
            out.append(user)
        return out

    def set_user(self, provider: str, username: str, **fields) -> bool:
        """Change ``password_hash`` / ``totp_secret`` (None removes TOTP) /
        ``disabled_at`` (None enables); False if there is no such user."""
        sets = [(k, v) for k, v in fields.items() if k in ("password_hash", "totp_secret", "email", "disabled_at")]
        with self.store.transaction() as db:
            cur = db.execute("UPDATE zt_users SET " + ", ".join(f"{k} = ?" for k, _ in sets) +
                             (", totp_step = 0" if "totp_secret" in fields else "") +
                             " WHERE provider = ? AND username = ?", (*[v for _, v in sets], provider, username))
            return cur.rowcount == 1

    def delete_user(self, provider: str, username: str) -> bool:
        with self.store.transaction() as db:
            db.execute("DELETE FROM zt_groups WHERE provider = ? AND username = ?", (provider, username))
            db.execute("DELETE FROM zt_devices WHERE provider = ? AND username = ?", (provider, username))
            return db.execute("DELETE FROM zt_users WHERE provider = ? AND username = ?",
                              (provider, username)).rowcount == 1

    def set_groups(self, provider: str, username: str, add=(), remove=()) -> list[str]:
        add, remove = check_groups(add), check_groups(remove)
        with self.store.transaction() as db:
            if not db.execute("SELECT 1 FROM zt_users WHERE provider = ? AND username = ?",
                              (provider, username)).fetchone():
                raise PolicyError(f"no user {username!r} ({provider})")
            for g in add:
                db.execute("INSERT OR IGNORE INTO zt_groups VALUES (?, ?, ?)", (provider, username, g))
            for g in remove:
                db.execute("DELETE FROM zt_groups WHERE provider = ? AND username = ? AND grp = ?",
                           (provider, username, g))
            return [g for (g,) in db.execute("SELECT grp FROM zt_groups WHERE provider = ? AND username = ?"
                                             " ORDER BY grp", (provider, username))]

    def list_groups(self) -> dict[str, list[tuple[str, str]]]:
        """Group -> its members (provider, username) in relayd's directory
        (an external provider's groups come with its tokens, not from here)."""
        out: dict = {}
        for g, p, u in self.store.query("SELECT grp, provider, username FROM zt_groups ORDER BY grp, provider,"
                                        " username"):
            out.setdefault(g, []).append((p, u))
        return out

    def spend_totp_step(self, provider: str, username: str, step: int) -> bool:
        """Record ``step`` as used; False if it (or a later one) was used
        already: one code, one use (RFC 6238 section 5.2)."""
        with self.store.transaction() as db:
            cur = db.execute("UPDATE zt_users SET totp_step = ? WHERE provider = ? AND username = ?"
                             " AND totp_step < ?", (step, provider, username, step))
            return cur.rowcount == 1

    # -- devices ---------------------------------------------------------------

    def register_device(self, device_id: str, provider: str, username: str, secret: str | None,
                        new_secret: str, hostname: str | None, limit: int, now: float) -> bool:
        """Check the on-boarding secret of a known (device, user), or
        register a new one with ``new_secret``: True when new. AuthError on
        a wrong secret or beyond the user's device limit."""
        with self.store.transaction() as db:
            row = db.execute("SELECT onboard_sha256 FROM zt_devices WHERE device_id = ? AND provider = ?"
                             " AND username = ?", (device_id, provider, username)).fetchone()
            if row is not None:
                if not isinstance(secret, str) or not hmac.compare_digest(row[0], _h(secret)):
                    raise AuthError("this device is registered to this user: its on-boarding secret is missing "
                                    "or wrong (remove the device with `relayd admin device rm` to register again)")
                db.execute("UPDATE zt_devices SET last_seen = ?, hostname = ? WHERE device_id = ? AND provider = ?"
                           " AND username = ?", (now, hostname, device_id, provider, username))
                return False
            (n,) = db.execute("SELECT COUNT(*) FROM zt_devices WHERE provider = ? AND username = ?",
                              (provider, username)).fetchone()
            if n >= limit:
                raise AuthError(f"device limit reached ({limit}): remove a device first")
            db.execute("INSERT INTO zt_devices VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (device_id, provider, username, _h(new_secret), hostname, now, now))
            return True

    def list_devices(self) -> list[dict]:
        return [{"device_id": d, "provider": p, "username": u, "hostname": h, "first_seen": f, "last_seen": s}
                for d, p, u, h, f, s in self.store.query(
                    "SELECT device_id, provider, username, hostname, first_seen, last_seen FROM zt_devices"
                    " ORDER BY username, device_id")]

    def delete_device(self, device_id: str) -> int:
        with self.store.transaction() as db:
            return db.execute("DELETE FROM zt_devices WHERE device_id = ?", (device_id,)).rowcount

    # -- sessions ----------------------------------------------------------------

    def create_session(self, s: dict) -> None:
        with self.store.transaction() as db:
            db.execute("INSERT INTO zt_sessions(sid, provider, username, device_id, cert_sha256, state, created_at,"
                       " expires_at, auth, stepup) VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?)",
                       (s["sid"], s["provider"], s["username"], s["device_id"], s["cert_sha256"], s["created_at"],
                        s["expires_at"], json.dumps(s["auth"]), json.dumps(s.get("stepup", {}))))

    def get_session(self, sid: str) -> dict | None:
        rows = self.store.query("SELECT provider, username, device_id, cert_sha256, state, created_at, expires_at,"
                                " auth, stepup FROM zt_sessions WHERE sid = ?", (sid,))
        if not rows:
            return None
        p, u, d, c, st, ca, ea, auth, su = rows[0]
        return {"sid": sid, "provider": p, "username": u, "device_id": d, "cert_sha256": c, "state": st,
                "created_at": ca, "expires_at": ea, "auth": json.loads(auth), "stepup": json.loads(su)}

    def update_session(self, sid: str, check, change: dict) -> dict:
        """In one transaction: read the session, ``check(session)`` (raises
        to refuse), write ``change`` (cert_sha256, stepup, state). A
        renewal or step-up racing a kill: whichever commits second sees the
        other's state."""
        with self.store.transaction() as db:
            row = db.execute("SELECT provider, username, device_id, cert_sha256, state, expires_at, auth, stepup"
                             " FROM zt_sessions WHERE sid = ?", (sid,)).fetchone()
            if row is None:
                raise AuthError("unknown session")
            s = {"sid": sid, "provider": row[0], "username": row[1], "device_id": row[2], "cert_sha256": row[3],
                 "state": row[4], "expires_at": row[5], "auth": json.loads(row[6]), "stepup": json.loads(row[7])}
            check(s)
            for k, v in change.items():
                db.execute(f"UPDATE zt_sessions SET {k} = ? WHERE sid = ?",
                           (json.dumps(v) if k in ("stepup", "auth") else v, sid))
                s[k] = v
            return s

    def end_sessions(self, where: str, params: tuple) -> list[str]:
        """Mark the sessions matching ``where`` revoked; their sids."""
        with self.store.transaction() as db:
            sids = [s for (s,) in db.execute(f"SELECT sid FROM zt_sessions WHERE state = 'active' AND ({where})",
                                             params)]
            db.executemany("UPDATE zt_sessions SET state = 'revoked' WHERE sid = ?", [(s,) for s in sids])
            return sids

    def list_sessions(self, active_only: bool = True) -> list[dict]:
        q = "SELECT sid FROM zt_sessions" + (" WHERE state = 'active' AND expires_at > ?" if active_only else "")
        return [self.get_session(s) for (s,) in self.store.query(q, (time.time(),) if active_only else ())]

    # -- policy ---------------------------------------------------------------------

    def policy(self) -> Policy:
        with self.store.transaction() as db:  # one consistent read of pv and rows
            (pv,) = db.execute("SELECT value FROM meta WHERE key = 'zt_pv'").fetchone()
            p = Policy(int(pv))
            for kind, body in db.execute("SELECT kind, body FROM zt_policy"):
                obj = json.loads(body)
                p.table(kind)[obj["id"]] = obj
        return p

    def pv(self) -> int:
        return int(self.store.query("SELECT value FROM meta WHERE key = 'zt_pv'")[0][0])

    def put_policy(self, kind: str, doc: dict, *, create: bool = False) -> tuple[dict, int]:
        """Add or replace one object (validated; references checked against
        the rest): (its normal form with its rev, the new pv). ``create``:
        Conflict if one of that id exists."""
        obj = check(kind, doc)
        with self.store.transaction() as db:
            if create and db.execute("SELECT 1 FROM zt_policy WHERE kind = ? AND id = ?", (kind, obj["id"])).fetchone():
                raise Conflict(f"{kind} {obj['id']} exists already")
            p = Policy()
            for k, body in db.execute("SELECT kind, body FROM zt_policy"):
                o = json.loads(body)
                p.table(k)[o["id"]] = o
            p.table(kind)[obj["id"]] = obj
            bad = p.references()
            if bad:
                raise PolicyError(bad[0])
            row = db.execute("SELECT rev FROM zt_policy WHERE kind = ? AND id = ?", (kind, obj["id"])).fetchone()
            rev = (row[0] if row else 0) + 1
            if kind == "entitlements":
                obj["rev"] = rev
            db.execute("INSERT INTO zt_policy VALUES (?, ?, ?, ?) ON CONFLICT(kind, id) DO UPDATE SET"
                       " body = excluded.body, rev = excluded.rev", (kind, obj["id"], json.dumps(obj), rev))
            return obj, self._bump_pv(db)

    def delete_policy(self, kind: str, ident: str) -> int | None:
        """Remove one object: the new pv, None if it did not exist;
        PolicyError if something still refers to it."""
        if kind not in KINDS:
            raise PolicyError(f"unknown policy kind {kind!r}")
        with self.store.transaction() as db:
            p = Policy()
            for k, body in db.execute("SELECT kind, body FROM zt_policy"):
                o = json.loads(body)
                p.table(k)[o["id"]] = o
            if ident not in p.table(kind):
                return None
            del p.table(kind)[ident]
            bad = p.references()
            if bad:
                raise Conflict(f"still in use: {bad[0]}")
            db.execute("DELETE FROM zt_policy WHERE kind = ? AND id = ?", (kind, ident))
            return self._bump_pv(db)

    def import_policy(self, p: Policy) -> int:
        """Replace the whole policy with ``p`` (already validated)."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM zt_policy")
            for kind in KINDS:
                for obj in p.table(kind).values():
                    if kind == "entitlements":
                        obj["rev"] = obj.get("rev", 1)
                    db.execute("INSERT INTO zt_policy VALUES (?, ?, ?, 1)", (kind, obj["id"], json.dumps(obj)))
            return self._bump_pv(db)

    @staticmethod
    def _bump_pv(db) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'zt_pv'")
        return int(db.execute("SELECT value FROM meta WHERE key = 'zt_pv'").fetchone()[0])

    # -- revocations ------------------------------------------------------------------

    def add_revocation(self, op: str, selector: dict, types: list, issued_before: float, effective_at: float,
                       expires_at: float, reason: str, actor: str, end_sessions: tuple | None = None) -> dict:
        """Append one entry (and, for kill/lock, mark the matching sessions
        revoked in the same transaction): the entry with its seq."""
        with self.store.transaction() as db:
            cur = db.execute("INSERT INTO zt_revocations(op, selector, types, issued_before, effective_at,"
                             " expires_at, reason, actor) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (op, json.dumps(selector), json.dumps(types), issued_before, effective_at, expires_at,
                              reason, actor))
            if end_sessions is not None:
                db.execute("UPDATE zt_sessions SET state = 'revoked' WHERE state = 'active' AND (" +
                           end_sessions[0] + ")", end_sessions[1])
            seq = cur.lastrowid
        return {"seq": seq, "op": op, "selector": selector, "types": types, "issued_before": issued_before,
                "effective_at": effective_at, "expires_at": expires_at, "reason": reason, "actor": actor}

    def revocations(self, since: int = 0, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        return [{"seq": s, "op": o, "selector": json.loads(sel), "types": json.loads(t), "issued_before": ib,
                 "effective_at": ea, "expires_at": xa, "reason": r, "actor": a}
                for s, o, sel, t, ib, ea, xa, r, a in self.store.query(
                    "SELECT seq, op, selector, types, issued_before, effective_at, expires_at, reason, actor"
                    " FROM zt_revocations WHERE seq > ? AND expires_at > ? ORDER BY seq", (since, now))]

    def last_seq(self) -> int:
        return int(self.store.query("SELECT COALESCE(MAX(seq), 0) FROM zt_revocations")[0][0])

    def prune_revocations(self, now: float) -> int:
        with self.store.transaction() as db:
            return db.execute("DELETE FROM zt_revocations WHERE expires_at <= ?", (now,)).rowcount
