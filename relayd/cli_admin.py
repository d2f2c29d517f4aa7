"""`relayd admin ...`: every subcommand, on a relay's data directory
(``--data DIR``) or on a running relay's admin API (``--api URL``).

Each subcommand has one implementation, which makes REST calls and prints
what they answer. The calls go to a ``Backend``: in this process through
the relay's own route table over the data directory (``Api.local``: the
same checks and handlers as the relay's, without the key), or over HTTPS to
the relay (relayd.client.admin). So a subcommand prints the same lines
either way, and refuses the same things with the same messages; a refusal
exits with 2 when the request was wrong (400, 409, 413, 415, 422), 1 when
refused or not found (401, 403, 404), 75 when it may pass later (429, 502
to 504, the relay unreachable). See docs/api.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import urllib.parse
from pathlib import Path

import orjson

from relayd.errors import AuthError, ConfigError, RelaydError, TemporaryError

JSON = "application/json"
REMOTE = ("api", "admin_key", "admin_key_file", "ca", "pin")


def add_target(p: argparse.ArgumentParser, top: bool = False) -> None:
    """The options that say which relay: ``--data DIR`` (a leaf's), or
    ``--api URL`` with the key and the trust (before the subcommand or
    after it)."""
    keep = {} if top else {"default": argparse.SUPPRESS}
    if not top:
        p.add_argument("--data", metavar="DIR", help="the relay's data directory (on the relay's host)")
    g = p.add_argument_group("a remote relay (instead of --data)")
    g.add_argument("--api", metavar="URL", help="the relay's admin API: https://HOST[:PORT] (its HTTPS port)", **keep)
    # (dest admin_key: `relayd admin api-key` keeps args.api_key for its own subcommand)
    g.add_argument("--api-key", dest="admin_key", metavar="KEY", help="the admin key (default: $RELAYD_API_KEY)",
                   **keep)
    g.add_argument("--api-key-file", dest="admin_key_file", metavar="FILE", help="read the admin key from FILE",
                   **keep)
    g.add_argument("--ca", metavar="FILE", help="the relay's CA certificate (PEM) to verify it by", **keep)
    g.add_argument("--pin", metavar="SHA256", help="or the relay CA's SHA-256 pin (as in a join token)", **keep)


class Backend:
    """REST calls to one relay's API: ``call(method, path, doc)`` -> the
    answer's JSON (or text); a refusal raises with the API's message."""

    where = ""

    def request(self, method: str, path: str, body: bytes, headers: tuple) -> tuple[int, str, bytes]:
        raise NotImplementedError

    def call(self, method: str, path: str, doc=None, *, accept: str = JSON):
        body, headers = b"", [(b"Accept", accept.encode())]
        if doc is not None:
            body = orjson.dumps(doc)
            headers.append((b"Content-Type", JSON.encode()))
        status, ctype, data = self.request(method, path, body, tuple(headers))
        is_json = ctype.split(";", 1)[0].strip() == JSON
        if status >= 400:
            raise _refusal(status, orjson.loads(data) if is_json and data else {}, self.where)
        if not is_json:
            return data.decode("utf-8", "replace")
        return orjson.loads(data) if data else None

    def close(self) -> None:
        pass


def _refusal(status: int, doc: dict, where: str) -> RelaydError:
    msg = doc.get("message") if isinstance(doc, dict) and isinstance(doc.get("message"), str) else f"HTTP {status}"
    if status == 401:
        msg += " (the admin key: --api-key-file FILE, --api-key KEY or $RELAYD_API_KEY)"
    if isinstance(doc, dict) and doc.get("error") == "not_found" and msg.startswith("no such route"):
        msg = f"{where} has no such route (a relay older than this command?)"
    if status in (400, 409, 413, 415, 422):
        return ConfigError(msg)
    if status in (429, 502, 503, 504):
        return TemporaryError(msg)
    if status in (401, 403):
        return AuthError(msg)
    return RelaydError(msg)


class _LazyController:
    """The zero-trust controller, made at its first use: it loads keys and
    hashes a password at start, which `relayd admin agents` need not pay."""

    def __init__(self, data: Path, zs) -> None:
        self.zs = zs
        self._data = data
        self._ctl = None

    def __getattr__(self, name):
        if self._ctl is None:
            from relayd.control.zerotrust import Controller, ZtConfig

            self._ctl = Controller(self._data, self.zs, ZtConfig())
        return getattr(self._ctl, name)


def open_data(data: str):
    """A relay's data directory: (path, CA, store); ConfigError if it is
    none."""
    from relayd.control.store import open_data_dir

    d = Path(data)
    if not (d / "relay.json").is_file() or not (d / "ca" / "ca.crt").is_file():
        raise ConfigError(f"{d} is not a relay data directory: start `relayd serve --data {d}` once first")
    ca, store = open_data_dir(d, create=False)
    return d, ca, store


class LocalBackend(Backend):
    """The relay's route table over its data directory, in this process:
    the part of it one subcommand calls (``relay``, ``zt`` or ``otp``; the
    zero-trust part alone takes as long to import as the rest)."""

    def __init__(self, data: str, part: str) -> None:
        import relayd
        from relayd.control import admin
        from relayd.control.api import Api

        d, ca, self.store = open_data(data)
        self.where = str(d)
        try:
            view = admin.RelayView(d, self.store)
            self.api = Api(self.store.check_admin_key, relayd.__version__)
            if part == "relay":
                self.api.add(admin.AdminResources(self.store, ca, d, view).ops(), admin.SCHEMAS)
            elif part == "zt":
                from relayd.control import ztapi
                from relayd.control.ztstore import ZtStore

                self.api.add(ztapi.ZtResources(_LazyController(d, ZtStore(self.store))).ops(), ztapi.SCHEMAS)
            else:
                from relayd.control import provisioning
                from relayd.control.est import PREFIX as EST

                def est_url() -> str | None:
                    https = view.info().get("https")
                    return f"https://{https}{EST}" if https else None

                otps = provisioning.Provisioning(provisioning.Otps(self.store), None, est_url, ca.pin)
                self.api.add(otps.ops(), provisioning.SCHEMAS)
        except BaseException:
            self.store.close()
            raise

    def request(self, method, path, body, headers):
        reply = self.api.local(method, path, body, headers)
        return reply.status, reply.content_type.decode("latin-1"), reply.body

    def close(self) -> None:
        self.store.close()


class HttpBackend(Backend):
    def __init__(self, args: argparse.Namespace) -> None:
        from relayd.client.admin import AdminClient, context

        key = args.admin_key
        if args.admin_key_file:
            try:
                key = Path(args.admin_key_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"--api-key-file {args.admin_key_file}: {exc.strerror}") from None
        key = key or os.environ.get("RELAYD_API_KEY", "").strip()
        if not key:
            raise ConfigError("--api needs the admin key: --api-key-file FILE, --api-key KEY or $RELAYD_API_KEY")
        self.client = AdminClient(args.api, key, context(args.api, args.ca, args.pin))
        self.where = args.api

    def request(self, method, path, body, headers):
        return self.client.request(method, path, body, headers)


def open_backend(args: argparse.Namespace) -> Backend:
    for k in REMOTE:
        if not hasattr(args, k):
            setattr(args, k, None)
    data = getattr(args, "data", None)
    if bool(data) == bool(args.api):
        raise ConfigError("give --data DIR (on the relay's host) or --api https://HOST[:PORT] (a running relay)")
    if data:
        if any(getattr(args, k) for k in REMOTE[1:]):
            raise ConfigError("--api-key, --api-key-file, --ca and --pin go with --api")
        from relayd.cli_zerotrust import ADMIN_COMMANDS

        return LocalBackend(data, "zt" if args.admin in ADMIN_COMMANDS else "otp" if args.admin == "otp" else "relay")
    return HttpBackend(args)


def seg(value: str) -> str:
    """A value as one path segment."""
    return urllib.parse.quote(value, safe="")


def when(t: str | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    """An RFC 3339 time in local time, or ``-``."""
    if not t:
        return "-"
    return time.strftime(fmt, time.localtime(datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()))


# -- the subcommands ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from relayd import cli_zerotrust

    b = open_backend(args)
    try:
        if args.admin in cli_zerotrust.ADMIN_COMMANDS:
            return cli_zerotrust.admin(args, b)
        return COMMANDS[args.admin](args, b) or 0
    finally:
        b.close()


def join_token(args, b: Backend) -> None:
    doc = b.call("POST", "/admin/join-tokens", {"endpoints": args.endpoint or [], "ttl": args.ttl,
                                                 "transport": args.transport})
    print(doc["token"])


def join_tokens(args, b: Backend) -> None:
    items = b.call("GET", "/admin/join-tokens")["items"]
    print(f"{'ID':<18} {'STATE':<8} {'EXPIRES':<20} {'ENDPOINTS':<20} AGENT")
    for t in items:
        print(f"{t['id']:<18} {t['state']:<8} {when(t['expires_at']):<20} {','.join(t['endpoints']) or '*':<20} "
              f"{t['agent_id'] or '-'}")


def revoke_join_token(args, b: Backend) -> None:
    b.call("DELETE", f"/admin/join-tokens/{seg(args.id)}")
    print(f"revoked join token {args.id}")


def ca_cert(args, b: Backend) -> None:
    sys.stdout.write(b.call("GET", "/admin/ca")["certificate"])


def agents(args, b: Backend) -> None:
    if args.id:
        a = b.call("GET", f"/admin/agents/{seg(args.id)}")
        rows = [("id", a["id"]), ("status", a["status"]), ("endpoints", ",".join(a["endpoints"]) or "* (any)"),
                ("offered", ",".join(a["offered"]) if a["offered"] is not None else "-"),
                ("serving", ",".join(a["serving"]) if a["serving"] is not None else "-"),
                ("address", a["address"] or "-"), ("connected since", when(a["connected_since"])),
                ("last seen", when(a["last_seen"])), ("streams", "-" if a["streams"] is None else a["streams"]),
                ("bytes in", a["bytes_in"]), ("bytes out", a["bytes_out"]), ("enrolled", when(a["created_at"])),
                ("certificate until", when(a["cert_not_after"])), ("revoked", when(a["revoked_at"]))]
        if a["device"]:
            rows.append(("device", f"{a['device']['name']} ({'claimed' if a['device']['claimed'] else 'unclaimed'})"))
        for k, v in rows:
            print(f"{k + ':':<19}{v}")
        return
    items = b.call("GET", "/admin/agents")["items"]
    print(f"{'ID':<16} {'ENDPOINTS':<20} {'STATUS':<8} {'CONNECTED SINCE':<20} {'ADDRESS':<22} "
          f"{'BYTES IN':>12} {'BYTES OUT':>12}")
    for a in items:
        print(f"{a['id']:<16} {','.join(a['endpoints']) or '*':<20} {a['status']:<8} {when(a['connected_since']):<20} "
              f"{a['address'] or '-':<22} {a['bytes_in']:>12} {a['bytes_out']:>12}")


def revoke_agent(args, b: Backend) -> None:
    b.call("POST", f"/admin/agents/{seg(args.id)}/revoke")
    print(f"revoked {args.id}: a running relay cuts its link within a second")


def _n(v) -> str:
    return "-" if v is None else str(v)


def endpoints(args, b: Backend) -> None:
    items = b.call("GET", "/admin/endpoints")["items"]
    print(f"{'NAME':<20} {'KIND':<5} {'ADDRESS':<28} {'AGENTS':>6} {'CONNS':>6} {'STREAMS':>7} {'BYTES IN':>12} "
          f"{'BYTES OUT':>12}")
    for e in items:
        print(f"{e['name']:<20} {e['kind']:<5} {e['listen'] or e['route'] or '-':<28} "
              f"{_n(None if e['agents'] is None else len(e['agents'])):>6} {_n(e['connections']):>6} "
              f"{_n(e['streams_active']):>7} {_n(e['bytes_in']):>12} {_n(e['bytes_out']):>12}")


def status(args, b: Backend) -> None:
    s = b.call("GET", "/admin/status")
    a = s["agents"]
    for k, v in (("relay", f"relayd {s['version']}" + ("" if s["live"] else " (read from its data directory)")),
                 ("node", s["node"] or "-"), ("started", when(s["started_at"])), ("hostname", s["hostname"] or "-"),
                 ("agents address", s["agents_address"]), ("https address", s["https_address"] or "-"),
                 ("CA pin", s["ca_pin"]), ("agents", f"{a['online']} online, {a['total']} enrolled, "
                                                   f"{a['revoked']} revoked"),
                 ("endpoints", s["endpoints"]), ("hybrid connections", f"{s['hybrid_connections']} "
                                                                       f"({s['hybrid_listeners']} listeners)"),
                 ("join tokens", f"{s['join_tokens_pending']} pending")):
        print(f"{k + ':':<20}{v}")


def api_key(args, b: Backend) -> None:
    print(b.call("POST", "/admin/api-key/rotate")["key"])
    print("the previous admin API key no longer works (a running relay too)", file=sys.stderr)


# -- hybrid connections -------------------------------------------------------------------------------


def _rules_base(path: str | None) -> str:
    from relayd.control.admin import hc_id

    return f"/admin/hybrid-connections/{seg(hc_id(path.strip('/')))}/rules" if path else "/admin/hybrid-rules"


def _rights(rules) -> str:
    return ", ".join(f"{r['name']} ({','.join(sorted(r['rights']))})" for r in rules) or "-"


def hc(args, b: Backend) -> int:
    from relayd.control.admin import hc_id

    cmd = args.hc
    if cmd == "create":
        doc = {"path": args.path, "requires_client_auth": not args.no_client_auth, "websocket": not args.no_websocket,
               "http": not args.no_http}
        if args.response_timeout:
            doc["response_timeout"] = args.response_timeout
        if args.control_threshold is not None:
            doc["control_threshold"] = args.control_threshold
        print(f"created hybrid connection {b.call('POST', '/admin/hybrid-connections', doc)['path']}")
    elif cmd == "delete":
        b.call("DELETE", f"/admin/hybrid-connections/{seg(hc_id(args.path.strip('/')))}")
        print(f"deleted hybrid connection {args.path}: a running relay closes its listeners")
    elif cmd == "list":
        rules = b.call("GET", "/admin/hybrid-rules")["items"]
        items = b.call("GET", "/admin/hybrid-connections")["items"]
        print("node rules: " + _rights(rules))
        print(f"{'PATH':<32} {'CLIENT AUTH':<11} {'WEBSOCKET':<9} {'HTTP':<5} {'TIMEOUT':>8} {'THRESHOLD':>9} "
              f"{'LISTENERS':>9}  RULES")
        yes = {True: "yes", False: "no"}
        for h in items:
            if "websocket" not in h:  # the config's, seen from a data directory
                print(f"{h['path']:<32} (from the relay's config) {'':>37} {len(h['listeners']):>9}")
                continue
            print(f"{h['path']:<32} {yes[h['requires_client_auth']]:<11} {yes[h['websocket']]:<9} "
                  f"{yes[h['http']]:<5} {h['response_timeout']:>7g}s {h['control_threshold']:>9} "
                  f"{len(h['listeners']):>9}  {_rights(h['rules'])}")
        for h in items:
            for lst in h["listeners"]:
                print(f"  listener of {h['path']}: {lst['id']} since {when(lst['since'])} from {lst['address']}")
    elif cmd == "rule":
        base, scope = _rules_base(args.path), args.path or "the node"
        if args.rule == "add":
            body = {"name": args.name, "rights": [r.strip().lower() for r in args.rights.split(",")]}
            if args.key:
                body["key"] = args.key
            rule = b.call("POST", base, body)
            print(f"added rule {rule['name']} ({','.join(rule['rights'])}) to {scope}")
            print(f"key: {rule['primary_key']}")
        elif args.rule == "rotate":
            rule = b.call("POST", f"{base}/{seg(args.name)}/rotate", {"key": args.key} if args.key else None)
            print(f"rotated rule {rule['name']} of {scope}: tokens signed with the previous key stay good until the "
                  "next rotation")
            print(f"key: {rule['primary_key']}")
        else:
            b.call("DELETE", f"{base}/{seg(args.name)}")
            print(f"removed rule {args.name} from {scope}")
    elif cmd == "connection-string":
        keys = b.call("POST", f"{_rules_base(args.path)}/{seg(args.name)}/list-keys",
                      {"host": args.host} if args.host else None)
        cs = keys["secondary_connection_string" if args.secondary else "primary_connection_string"]
        if not cs:
            raise RelaydError(f"rule {args.name!r} has no secondary key (it was never rotated)")
        print(cs)
    return 0


# -- device provisioning OTPs -------------------------------------------------------------------------


def otp(args, b: Backend) -> int:
    if args.otp == "create":
        labels = {}
        for item in args.label or []:
            k, eq, v = item.partition("=")
            if not eq or not k:
                raise ConfigError(f"--label {item!r}: KEY=VALUE")
            labels[k] = v
        body = {"ttl": args.ttl, "labels": labels}
        if args.count != 1:  # a fleet: one request, one transaction
            if args.name:
                body["device_name_prefix"] = args.name
            docs = b.call("POST", "/admin/otps/batch", {**body, "count": args.count})["items"]
        else:
            docs = [b.call("POST", "/admin/otps", {**body, **({"device_name": args.name} if args.name else {})})]
        if docs[0].get("est_url") is None:
            print("this relay has no --https listener: devices cannot reach EST until it has one", file=sys.stderr)
        for doc in docs:
            print(orjson.dumps(doc).decode() if args.json else doc["otp"])
        doc = docs[0]
        if not args.json:
            ids = f"id {doc['otp_id']}" if len(docs) == 1 else f"ids {doc['otp_id']} to {docs[-1]['otp_id']}"
            code = doc["otp"] if len(docs) == 1 else "OTP"
            print(f"{ids}, expires {doc['expires_at']}; on the device: relayd agent --otp {code} "
                  f"--est {doc.get('est_url') or 'https://RELAY'} --pin {doc['ca_sha256']}", file=sys.stderr)
    elif args.otp == "list":
        items = b.call("GET", "/admin/otps")["items"]
        print(f"{'ID':<18} {'STATE':<8} {'EXPIRES':<20} {'NAME':<20} DEVICE")
        for r in items:
            print(f"{r['otp_id']:<18} {r['state']:<8} {when(r['expires_at']):<20} "
                  f"{(r['device_name'] or '-')[:20]:<20} {r['device_id'] or '-'}")
    else:
        b.call("DELETE", f"/admin/otps/{seg(args.id)}")
        print(f"revoked {args.id}")
    return 0


COMMANDS = {"join-token": join_token, "join-tokens": join_tokens, "revoke-join-token": revoke_join_token,
            "ca-cert": ca_cert, "agents": agents, "revoke-agent": revoke_agent, "endpoints": endpoints,
            "status": status, "api-key": api_key, "hc": hc, "otp": otp}
