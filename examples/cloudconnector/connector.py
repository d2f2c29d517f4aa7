"""The CloudConnector pattern over a hybrid connection: an on-premises
listener that takes instructions from a cloud application and runs them
against a local database (SQLite here), as ConnectMyApps' CloudConnector
does over Azure Relay.

Each instruction is an HTTP-mode request whose JSON body carries the
database credentials for that one request, the operation and its
parameters:

    {"credentials": {"user": "app", "password": "..."},
     "operation": "query" | "execute",
     "sql": "SELECT name FROM customers WHERE id = ?", "params": [7]}

The credentials are checked against the database's own user table (a salted
PBKDF2 hash: the database, not the connector, knows who may connect), used
for that request and dropped: never stored, never logged. The connector's
own log (``--log FILE``, JSON lines) records request metadata only: when,
the request's id, the operation, how many rows, how long, the outcome;
never the SQL's parameters, the results or the credentials.

    python examples/cloudconnector/connector.py --db app.db --log connector.log \\
        --connection-string "Endpoint=sb://relay.example.com/;...;EntityPath=connector" [--ca relay-ca.pem]
    python examples/cloudconnector/connector.py --db app.db --add-user app     # asks for the password
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import ssl
import sys
import time
import uuid

from relayd.client import hybrid

_ALLOWED = ("select", "insert", "update", "delete")


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 200_000)


def add_user(db_path: str, user: str, password: str) -> None:
    with sqlite3.connect(db_path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS connector_users (name TEXT PRIMARY KEY, salt BLOB, hash BLOB)")
        salt = secrets.token_bytes(16)
        db.execute("INSERT OR REPLACE INTO connector_users VALUES (?, ?, ?)", (user, salt, _hash(password, salt)))


class Connector:
    """The listener's request handler: one instruction, one answer."""

    def __init__(self, db_path: str, log_path: str) -> None:
        self.db_path = db_path
        self.log_path = log_path

    def _log(self, **meta) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **meta}) + "\n")

    async def __call__(self, request: hybrid.Request) -> hybrid.Response:
        rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        started = time.monotonic()
        try:
            status, result, operation = await asyncio.get_running_loop().run_in_executor(
                None, self._run, request.body)
        except Exception as exc:  # never echo the instruction or its data
            status, result, operation = 500, {"error": type(exc).__name__}, "?"
        self._log(request=rid[:64], operation=operation, status=status,
                  rows=result.get("count", 0) if isinstance(result, dict) else 0,
                  ms=round((time.monotonic() - started) * 1000, 1))
        return hybrid.Response(status, {"content-type": "application/json"}, json.dumps(result).encode())

    def _run(self, body: bytes) -> tuple[int, dict, str]:
        try:
            doc = json.loads(body)
            creds, operation, sql = doc["credentials"], doc["operation"], doc["sql"]
            params = doc.get("params", [])
            user, password = creds["user"], creds["password"]
        except (ValueError, KeyError, TypeError):
            return 400, {"error": "malformed instruction"}, "?"
        del doc, creds  # the credentials live in this frame only
        if operation not in ("query", "execute") or sql.strip().split(None, 1)[0].lower() not in _ALLOWED:
            return 400, {"error": "operation not allowed"}, str(operation)[:20]
        db = sqlite3.connect(self.db_path)
        try:
            row = db.execute("SELECT salt, hash FROM connector_users WHERE name = ?", (user,)).fetchone()
            ok = row is not None and hmac.compare_digest(_hash(password, row[0]), row[1])
            del password
            if not ok:
                return 401, {"error": "the database refused the credentials"}, operation
            cur = db.execute(sql, params)
            if operation == "query":
                rows = cur.fetchmany(10_000)
                return 200, {"count": len(rows), "rows": rows}, operation
            db.commit()
            return 200, {"count": cur.rowcount}, operation
        except sqlite3.Error as exc:
            return 400, {"error": f"database error ({type(exc).__name__})"}, operation
        finally:
            db.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", required=True)
    p.add_argument("--log", default="connector.log")
    p.add_argument("--connection-string", default=os.environ.get("RELAYD_HC_CONNECTION"))
    p.add_argument("--ca")
    p.add_argument("--add-user", metavar="NAME")
    args = p.parse_args(argv)
    if args.add_user:
        add_user(args.db, args.add_user, getpass.getpass(f"password for {args.add_user}: "))
        return 0
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else None
    listener = hybrid.Listener(args.connection_string, on_request=Connector(args.db, args.log), ssl=ctx)
    asyncio.run(listener.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
