"""The zero-trust part of the command line: `relayd login`, `relayd
connect`, and `relayd admin user|group|entitlement|policy|revoke|device|
sessions` on a relay's data directory (docs/zero-trust.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
import tomllib
from pathlib import Path

from relayd.cli_admin import add_target
from relayd.errors import ConfigError

DEFAULT_CLIENT_DATA = Path.home() / ".relayd-client"


def add_client_parsers(sub) -> None:
    lg = sub.add_parser("login", help="sign in to a relay's zero-trust controller")
    lg.add_argument("url", help="https://RELAY[:PORT] (the relay's HTTPS port)")
    lg.add_argument("--provider", default="local", help="local (relayd's own users) or an OpenID Connect provider")
    lg.add_argument("--user", help="user name (local provider)")
    lg.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    lg.add_argument("--otp", help="one-time code (prompted when the user has an authenticator and this is absent)")
    lg.add_argument("--ca", help="the relay's CA certificate (PEM), first login")
    lg.add_argument("--pin", help="the relay CA's SHA-256 pin (as in a join token), first login")
    lg.add_argument("--data", default=str(DEFAULT_CLIENT_DATA), help="client data directory")
    lg.set_defaults(func=cmd_login)

    cn = sub.add_parser("connect", help="reach the services the signed-in user is entitled to")
    cn.add_argument("--data", default=str(DEFAULT_CLIENT_DATA), help="client data directory")
    cn.add_argument("--socks", metavar="HOST:PORT", help="SOCKS5 proxy address (default 127.0.0.1:1080)",
                    default="127.0.0.1:1080")
    cn.add_argument("-L", dest="forwards", action="append", default=[], metavar="[BIND:]LPORT:HOST:PORT",
                    help="forward a local port to HOST:PORT at the site (repeatable)")
    cn.add_argument("--tun", nargs="?", const="relayd%d", metavar="NAME",
                    help="Linux: also carry IP packets (TCP, UDP, ICMP) to each site through a TUN device "
                         "(default name relayd%%d; needs CAP_NET_ADMIN)")
    cn.set_defaults(func=cmd_connect)


def add_admin_parsers(ads) -> None:
    u = ads.add_parser("user", help="zero-trust users of relayd's own directory")
    us = u.add_subparsers(dest="zt", required=True)
    ua = us.add_parser("add", help="add a user (prints the authenticator secret with --totp)")
    ua.add_argument("name")
    ua.add_argument("--group", action="append", default=[])
    ua.add_argument("--email")
    ua.add_argument("--totp", action="store_true", help="require a one-time code (TOTP) at sign-in")
    ua.add_argument("--password-stdin", action="store_true")
    us.add_parser("list", help="users and their groups")
    for name, what in (("rm", "remove a user (and kill their sessions)"),
                       ("passwd", "set a new password (kills the user's sessions)"),
                       ("totp", "new authenticator secret, or --off (kills the user's sessions)"),
                       ("disable", "refuse the user's sign-in and kill their sessions"),
                       ("enable", "let a disabled user sign in again")):
        x = us.add_parser(name, help=what)
        x.add_argument("name")
        if name in ("rm", "disable", "enable"):
            x.add_argument("--provider", default="local")
        if name == "passwd":
            x.add_argument("--password-stdin", action="store_true")
        if name == "totp":
            x.add_argument("--off", action="store_true")
    g = ads.add_parser("group", help="a user's groups")
    gs = g.add_subparsers(dest="zt", required=True)
    for name in ("add", "rm"):
        x = gs.add_parser(name)
        x.add_argument("user")
        x.add_argument("groups", nargs="+")
        x.add_argument("--provider", default="local")
    e = ads.add_parser("entitlement", help="entitlements (what users may reach)")
    es = e.add_subparsers(dest="zt", required=True)
    es.add_parser("list")
    x = es.add_parser("set", help="add or replace one from a TOML or JSON file")
    x.add_argument("file")
    x = es.add_parser("rm")
    x.add_argument("id")
    p = ads.add_parser("policy", help="the whole policy: sites, conditions, entitlements, policies")
    ps = p.add_subparsers(dest="zt", required=True)
    x = ps.add_parser("import", help="replace the policy with a TOML file")
    x.add_argument("file")
    ps.add_parser("export", help="print the policy as TOML")
    x = ps.add_parser("set", help="add or replace one object of KIND from a TOML or JSON file")
    x.add_argument("kind", choices=["sites", "conditions", "entitlements", "policies"])
    x.add_argument("file")
    x = ps.add_parser("rm")
    x.add_argument("kind", choices=["sites", "conditions", "entitlements", "policies"])
    x.add_argument("id")
    r = ads.add_parser("revoke", help="kill, lock, renew or re-evaluate users' sessions and tokens")
    r.add_argument("op", choices=["kill", "lock", "renew", "reevaluate"])
    r.add_argument("--user", help="a user (with --provider, default local)")
    r.add_argument("--provider")
    r.add_argument("--device")
    r.add_argument("--sid")
    r.add_argument("--site", help="that site's entitlement tokens only")
    r.add_argument("--all", action="store_true")
    r.add_argument("--types", default="claims,entitlements")
    r.add_argument("--delay", default="5m", help="renew: when old tokens stop working (default 5m)")
    r.add_argument("--until", help="lock: how long (default: until removed)")
    r.add_argument("--reason", default="")
    d = ads.add_parser("device", help="registered user devices")
    ds = d.add_subparsers(dest="zt", required=True)
    ds.add_parser("list")
    x = ds.add_parser("rm", help="drop a registration and kill its tokens")
    x.add_argument("id")
    ads.add_parser("sessions", help="live zero-trust sessions")
    for name in ("user", "group", "entitlement", "policy", "revoke", "device", "sessions"):
        top = ads.choices[name]
        leaves = [c for act in top._actions if isinstance(act, argparse._SubParsersAction)
                  for c in act.choices.values()]
        for leaf in leaves or [top]:
            add_target(leaf)


ADMIN_COMMANDS = {"user", "group", "entitlement", "policy", "revoke", "device", "sessions"}


def _password(stdin: bool, prompt: str = "Password: ") -> str:
    if stdin:
        return sys.stdin.readline().rstrip("\n")
    pw = getpass.getpass(prompt)
    if getpass.getpass("Again: ") != pw:
        raise ConfigError("the passwords differ")
    return pw


def _doc(path: str) -> dict:
    data = Path(path).read_bytes()
    try:
        return json.loads(data) if path.endswith(".json") else tomllib.loads(data.decode())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def admin(args, b) -> int:
    """The zero-trust subcommands, as REST calls to ``b`` (a
    relayd.cli_admin.Backend: the data directory or a remote relay)."""
    from relayd.cli_admin import seg, when
    from relayd.control.api import rfc3339
    from relayd.config import parse_duration

    a, op = args.admin, getattr(args, "zt", None)
    if a == "user":
        provider = getattr(args, "provider", "local")
        user = f"/admin/users/{seg(provider)}/{seg(args.name)}" if op != "list" and op != "add" else ""
        if op == "add":
            body = {"username": args.name, "password": _password(args.password_stdin), "groups": args.group,
                    "totp": args.totp, **({"email": args.email} if args.email else {})}
            u = b.call("POST", "/admin/users", body)
            print(f"user {args.name} added" + (f" (groups {','.join(args.group)})" if args.group else ""))
            if u.get("totp_secret"):
                print(f"authenticator secret: {u['totp_secret']}\n{u['totp_uri']}")
        elif op == "list":
            items = b.call("GET", "/admin/users")["items"]
            print(f"{'PROVIDER':<10} {'USER':<24} {'TOTP':<5} {'STATE':<8} GROUPS")
            for u in items:
                print(f"{u['provider']:<10} {u['username']:<24} {'yes' if u['totp'] else 'no':<5} "
                      f"{'disabled' if u['disabled'] else 'active':<8} {','.join(u['groups'])}")
        elif op == "rm":
            b.call("DELETE", user)
            print(f"user {args.name} removed; their sessions are cut")
        elif op in ("disable", "enable"):
            b.call("PATCH", user, {"disabled": op == "disable"})
            print(f"user {args.name} disabled; their sessions are cut" if op == "disable" else
                  f"user {args.name} may sign in again")
        elif op == "passwd":
            b.call("PATCH", user, {"password": _password(args.password_stdin)})
            print("password changed; the user's sessions are cut")
        elif op == "totp":
            u = b.call("PATCH", user, {"totp": "off" if args.off else "reset"})
            print("authenticator removed" if args.off else
                  f"authenticator secret: {u['totp_secret']}\n{u['totp_uri']}")
    elif a == "group":
        user = f"{seg(args.provider)}/{seg(args.user)}"
        for g in args.groups:
            b.call("PUT" if op == "add" else "DELETE", f"/admin/groups/{seg(g)}/members/{user}")
        groups = b.call("GET", f"/admin/users/{user}")["groups"]
        print(f"{args.user}: {','.join(groups) or '(no groups)'} (effective at the next renewal)")
    elif a in ("entitlement", "policy"):
        kind = "entitlements" if a == "entitlement" else getattr(args, "kind", None)
        if op == "list":
            for e in b.call("GET", "/admin/entitlements")["items"]:
                print(f"{e['id']:<24} site={e['site']:<12} rev={e.get('rev', 1):<3} conditions="
                      f"{','.join(e.get('conditions', [])) or '-'} actions={len(e['actions'])}")
        elif op == "set":
            doc = _doc(args.file)
            obj = doc.get(kind, [doc])[0] if kind in doc else doc
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                raise ConfigError(f"{args.file}: the {kind} object has no id")
            w = b.call("PUT", f"/admin/{kind}/{seg(obj['id'])}", obj)
            print(f"{kind} {w['item']['id']} saved; policy version {w['pv']}")
        elif op == "rm":
            w = b.call("DELETE", f"/admin/{kind}/{seg(args.id)}")
            print(f"{kind} {args.id} removed; policy version {w['pv']}")
        elif op == "import":
            print(f"policy imported; version {b.call('PUT', '/admin/policy', _doc(args.file))['pv']}")
        elif op == "export":
            sys.stdout.write(b.call("GET", "/admin/policy", accept="application/toml"))
    elif a == "revoke":
        sel: dict = {}
        if args.all:
            sel["all"] = True
        if args.user:
            sel["user"] = [args.provider or "local", args.user]
        elif args.provider:
            sel["provider"] = args.provider
        for k in ("device", "sid", "site"):
            if getattr(args, k):
                sel[k] = getattr(args, k)
        body = {"op": args.op, "selector": sel, "types": args.types.split(","), "reason": args.reason}
        if args.op == "renew":
            body["delay"] = args.delay
        if args.until:
            body["until"] = rfc3339(round(time.time() + parse_duration(args.until, "--until")))
        entries = b.call("POST", "/admin/revocations", body)["entries"]
        print(f"{args.op}: entry {entries[-1]['seq']}; a running relay applies it within a second")
    elif a == "device":
        if op == "list":
            for dv in b.call("GET", "/admin/devices")["items"]:
                print(f"{dv['device_id']}  {dv['provider']}/{dv['username']:<20} {dv['hostname'] or '-':<20} "
                      f"last seen {when(dv['last_seen'], '%Y-%m-%d %H:%M')}")
        else:
            b.call("DELETE", f"/admin/devices/{seg(args.id)}")
            print(f"device {args.id} removed; its tokens are revoked")
    elif a == "sessions":
        for s in b.call("GET", "/admin/sessions")["items"]:
            print(f"{s['sid']}  {s['provider']}/{s['username']:<20} device {s['device_id']} until "
                  f"{when(s['expires_at'], '%Y-%m-%d %H:%M')}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from relayd.client import zerotrust as zc

    password = None
    if args.provider == "local":
        if not args.user:
            raise ConfigError("--user is required with the local provider")
        password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
    try:
        state = zc.login(Path(args.data), args.url, provider=args.provider, username=args.user, password=password,
                         otp=args.otp, ca_file=args.ca, pin=args.pin)
    except zc.ZtClientError as exc:
        if exc.reason != "otp_required" or args.otp:
            raise
        code = input("One-time code: ")
        state = zc.login(Path(args.data), args.url, provider=args.provider, username=args.user, password=password,
                         otp=code, ca_file=args.ca, pin=args.pin)
    sites = ", ".join(s["id"] for s in state["sites"]) or "none"
    print(f"signed in as {state['username']} ({state['provider']}); sites: {sites}")
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    from relayd.client import zerotrust as zc
    from relayd.config import parse_hostport
    from relayd.net import run

    async def main() -> int:
        c = zc.Connector(Path(args.data))
        await c.start()
        host, port = parse_hostport(args.socks, "--socks")
        srv = await c.socks((host, port))
        print(f"SOCKS5 proxy on {host}:{srv.sockets[0].getsockname()[1]}; sites: {', '.join(c.sessions)}",
              flush=True)
        for f in args.forwards:
            parts = f.rsplit(":", 3)
            if len(parts) == 3:
                parts = ["127.0.0.1"] + parts
            if len(parts) != 4:
                raise ConfigError(f"-L {f!r}: expected [BIND:]LPORT:HOST:PORT")
            bind, lport, rhost, rport = parts
            await c.forward((bind, int(lport)), rhost, int(rport))
            print(f"forwarding {bind}:{lport} -> {rhost}:{rport}", flush=True)
        if args.tun:
            for site, (dev, addr, nets) in (await c.tun(args.tun)).items():
                print(f"TUN {dev} {addr} for site {site}: {', '.join(nets)}", flush=True)
        try:
            reasons = await c.wait_closed()
        finally:
            await c.close()
        print("relayd: every site's session is closed: " + ", ".join(f"{k}: {v}" for k, v in reasons.items()),
              file=sys.stderr, flush=True)
        return 1

    return run(main())
