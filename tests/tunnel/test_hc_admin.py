"""`relayd admin hc ...` on a real relay's data directory, as people type it:
hybrid connections and rules made, listed, rotated and removed; connection
strings as Azure's portal prints them, whose keys sign tokens that the
catalog accepts (and, after two rotations, refuses)."""

import time

import pytest

from relayd.control import sas
from relayd.control.store import open_data_dir
from tests.tunnel.processes import Proc, cli, free_port, wait_port


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hc") / "relay"
    agents, https = free_port(), free_port()
    proc = Proc(["serve", "--data", str(d), "--agents", f"127.0.0.1:{agents}", "--https", f"127.0.0.1:{https}",
                 "--hostname", "relay.test"])
    try:
        wait_port(https)
    finally:
        proc.stop()
    return d, https


def hc(data, *args, check=True):
    d, _ = data
    return cli("admin", "hc", *args, "--data", str(d), check=check)


def key_of(res) -> str:
    return next(line for line in res.stdout.splitlines() if line.startswith("key: "))[5:]


def catalog(data):
    ca, store = open_data_dir(data[0], create=False)
    try:
        return store.hc_catalog()
    finally:
        store.close()


def usable(data, path, cs_text, right):
    """A token signed with the connection string's key for ``path`` passes
    the catalog's rules for ``right``."""
    cs = sas.parse_connection_string(cs_text)
    hyc, _ = catalog(data).find(path)
    tok = sas.make_token(f"http://{cs.host}/{path}", cs.key_name, cs.key, int(time.time()) + 600)
    try:
        sas.check(tok, catalog(data).rules_for(hyc), {cs.host}, path, right, time.time())
        return True
    except sas.SasError:
        return False


def test_create_rules_connection_string_rotate_remove_delete(data):
    d, https = data
    assert hc(data, "create", "orders").stdout.strip() == "created hybrid connection orders"
    hc(data, "create", "a/b/c", "--no-client-auth", "--no-websocket", "--response-timeout", "2m",
       "--control-threshold", "4096")
    res = hc(data, "create", "ORDERS", check=False)
    assert res.returncode == 2 and "already exists" in res.stderr
    node_key = key_of(hc(data, "rule", "add", "--name", "RootManageSharedAccessKey", "--rights", "listen,send,manage"))
    listen_key = key_of(hc(data, "rule", "add", "orders", "--name", "orders-listen", "--rights", "listen"))
    assert len(node_key) == 44 and len(listen_key) == 44

    out = hc(data, "list").stdout
    assert "RootManageSharedAccessKey (listen,manage,send)" in out and "orders-listen (listen)" in out
    assert node_key not in out and listen_key not in out  # never keys
    row = next(line for line in out.splitlines() if line.startswith("a/b/c"))
    assert row.split()[:6] == ["a/b/c", "no", "no", "yes", "120s", "4096"]

    cs = hc(data, "connection-string", "orders", "--name", "orders-listen").stdout.strip()
    assert cs == (f"Endpoint=sb://127.0.0.1:{https}/;SharedAccessKeyName=orders-listen;SharedAccessKey={listen_key};"
                  "EntityPath=orders")
    node_cs = hc(data, "connection-string", "--name", "RootManageSharedAccessKey", "--host", "relay.test").stdout
    assert node_cs.strip() == f"Endpoint=sb://relay.test/;SharedAccessKeyName=RootManageSharedAccessKey;" \
                              f"SharedAccessKey={node_key}"
    assert usable(data, "orders", cs, "listen") and not usable(data, "orders", cs, "send")
    assert usable(data, "a/b/c", node_cs, "send")

    # Rotation: the old key stays good as the secondary, until the next one.
    new_key = key_of(hc(data, "rule", "rotate", "orders", "--name", "orders-listen"))
    assert new_key != listen_key
    secondary = hc(data, "connection-string", "orders", "--name", "orders-listen", "--secondary").stdout
    assert listen_key in secondary and usable(data, "orders", cs, "listen")
    hc(data, "rule", "rotate", "orders", "--name", "orders-listen", "--key", "a-key-chosen-by-the-admin-1")
    assert not usable(data, "orders", cs, "listen")

    assert hc(data, "rule", "remove", "orders", "--name", "orders-listen").returncode == 0
    res = hc(data, "rule", "remove", "orders", "--name", "orders-listen", check=False)
    assert res.returncode == 1 and "no rule" in res.stderr
    assert hc(data, "delete", "orders").returncode == 0
    assert catalog(data).find("orders") is None
    res = hc(data, "delete", "orders", check=False)
    assert res.returncode == 1


@pytest.mark.parametrize("args, text", [
    (("create", "bad//path"), "hybrid connection path"),
    (("rule", "add", "nowhere", "--name", "r", "--rights", "send"), "no hybrid connection"),
    (("rule", "add", "--name", "r", "--rights", "root"), "rights"),
    (("rule", "add", "--name", "bad name", "--rights", "send"), "SAS rule name"),
    (("rule", "add", "--name", "r", "--rights", "send", "--key", "short"), "16 to 256"),
    (("connection-string", "--name", "nobody"), "no rule"),
])
def test_bad_admin_input_is_refused_clearly(data, args, text):
    res = hc(data, *args, check=False)
    assert res.returncode in (1, 2) and text in res.stderr and "Traceback" not in res.stderr


def test_at_most_twelve_rules_per_scope(data):
    hc(data, "create", "many")
    for i in range(12):
        hc(data, "rule", "add", "many", "--name", f"r{i}", "--rights", "send")
    res = hc(data, "rule", "add", "many", "--name", "r12", "--rights", "send", check=False)
    assert res.returncode == 2 and "at most 12" in res.stderr
