"""examples/cloudconnector: a cloud application's instructions reach an
on-premises SQLite database through a hybrid connection; the database
credentials in each instruction, and the business data, reach no log line
(the connector's, relayd's) and no file but the database."""

import asyncio
import importlib.util
import json
import logging
import os
import pathlib
import ssl

from relayd.client import hybrid
from relayd.control import sas
from relayd.control.hybrid import Catalog, HybridConnection
from relayd.net import run
from tests.tunnel.util import start_relay

HERE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "cloudconnector" / "connector.py"
ROOT = sas.SasRule("RootManageSharedAccessKey", "cm9vdC1rZXktb2YtdGhlLW5vZGUtMTIzNA==",
                   rights=frozenset({"listen", "send", "manage"}))
PASSWORD = "s3cret-db-pass-Zq81"
CUSTOMER = "Ada Lovelace-Byron 4711"


def load_example():
    spec = importlib.util.spec_from_file_location("connector", HERE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_instructions_run_and_no_secret_or_data_is_logged(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    connector = load_example()
    db = tmp_path / "onprem.db"
    connector.add_user(str(db), "app", PASSWORD)
    log = tmp_path / "connector.log"

    async def main():
        relay = await start_relay(tmp_path, endpoints=(), https=("127.0.0.1", 0),
                                  hybrid=Catalog.of([HybridConnection("connector")], [ROOT]))
        ctx = ssl.create_default_context(cafile=str(relay.ca_path))
        cs = hybrid.parse_connection_string(
            f"Endpoint=sb://localhost:{relay.https_port}/;SharedAccessKeyName={ROOT.name};"
            f"SharedAccessKey={ROOT.primary_key};EntityPath=connector")
        listener = hybrid.Listener(cs, on_request=connector.Connector(str(db), str(log)), ssl=ctx)
        task = asyncio.ensure_future(listener.run())
        await asyncio.wait_for(listener.online.wait(), 10)

        async def send(instr, creds=("app", PASSWORD)):
            body = json.dumps({"credentials": {"user": creds[0], "password": creds[1]}, **instr}).encode()
            status, _, data = await hybrid.request(cs, "POST", "/run", body, ssl=ctx,
                                                   headers={"X-Request-Id": "req-1"})
            return status, json.loads(data)

        try:
            assert (await send({"operation": "execute", "sql": "CREATE TABLE customers (id INTEGER, name TEXT)"}))[0] \
                == 400  # only SELECT, INSERT, UPDATE, DELETE
            import sqlite3
            with sqlite3.connect(db) as c:
                c.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
            status, res = await send({"operation": "execute", "sql": "INSERT INTO customers VALUES (?, ?)",
                                      "params": [7, CUSTOMER]})
            assert (status, res["count"]) == (200, 1)
            status, res = await send({"operation": "query", "sql": "SELECT name FROM customers WHERE id = ?",
                                      "params": [7]})
            assert (status, res["rows"]) == (200, [[CUSTOMER]])
            status, res = await send({"operation": "query", "sql": "SELECT 1"}, creds=("app", "wrong-" + PASSWORD))
            assert status == 401
            status, _ = await send({"operation": "query", "sql": "SELECT nonsense FROM nowhere"})
            assert status == 400
        finally:
            await listener.close()
            await asyncio.wait_for(task, 10)
            await relay.stop()

    run(main())
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and all(json.loads(line)["request"] == "req-1" for line in lines)
    # Nothing secret or business-like anywhere but the database: the
    # connector's log, every log record, every file under tmp_path.
    for needle in (PASSWORD, CUSTOMER, "Lovelace"):
        assert needle not in caplog.text
        for path in tmp_path.rglob("*"):
            if path.is_file() and path.name not in ("onprem.db",) and not path.name.startswith("onprem.db-"):
                assert needle.encode() not in path.read_bytes(), f"{needle!r} in {path}"
    assert PASSWORD.encode() not in db.read_bytes()  # only its salted hash is stored
