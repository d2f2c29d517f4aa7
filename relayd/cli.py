"""The ``relayd`` command line (see DESIGN.md: keep these interfaces stable)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import sqlite3
import ssl
import sys
from pathlib import Path

import relayd
from relayd import _build, cli_admin, cli_zerotrust
from relayd.errors import AuthError, ConfigError, RelaydError, TemporaryError

#: Exit status of a failure that may pass (sysexits' EX_TEMPFAIL): the relay
#: could not be reached or failed while enrolling; the same command may
#: succeed later. A refusal exits with 1, a configuration error with 2.
EX_TEMPFAIL = 75


def version_lines() -> list[str]:
    import uvloop

    lines = [
        f"relayd {relayd.__version__}",
        f"python {platform.python_version()} ({platform.python_implementation()}, {platform.machine()})",
        f"uvloop {uvloop.__version__}",
        f"openssl {ssl.OPENSSL_VERSION}",
    ]
    try:
        import Cython

        lines.append(f"cython {Cython.__version__}")
    except ImportError:
        lines.append("cython not installed")
    if _build.extensions_disabled():
        lines.append("extensions disabled by RELAYD_NO_EXTENSIONS")
    for module, kind in _build.report().items():
        lines.append(f"{module}: {kind}")
    return lines


def cmd_version(args: argparse.Namespace) -> int:
    lines = version_lines()
    print("\n".join(lines))
    return 1 if any(line.endswith("MISSING") for line in lines) else 0


def _fail(msg: str, code: int = 2) -> int:
    print(f"relayd: error: {' '.join(msg.splitlines())}", file=sys.stderr)
    return code


def _os_error(exc: OSError) -> str:
    """What failed and where: ``PATH: reason`` (no traceback, no errno noise)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return reason
    where = os.fsdecode(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2)}"
    return f"{where}: {reason}"


def _signals_to(event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)


# -- serve ---------------------------------------------------------------------------


def serve_config(args: argparse.Namespace):
    from relayd import config as C

    cfg = C.load_serve(Path(args.config) if args.config else None)
    if args.data:
        cfg.data = Path(args.data)
    if args.agents:
        cfg.agents = C.parse_hostport(args.agents, "--agents")
    if args.public:
        cfg.public = C.parse_hostport(args.public, "--public")
    if args.hostname:
        cfg.hostname = args.hostname
    if args.redis:
        cfg.redis = C.check_redis_url(args.redis, "--redis")
    if args.metrics:
        cfg.metrics = C.parse_hostport(args.metrics, "--metrics")
    if args.https:
        cfg.https = C.parse_hostport(args.https, "--https")
    if args.grace is not None:
        cfg.grace = C.parse_duration(args.grace, "--grace")
    if args.agent_cert_ttl is not None:
        cfg.agent_cert_ttl = C.parse_duration(args.agent_cert_ttl, "--agent-cert-ttl")
    if args.drain is not None:
        cfg.drain = C.parse_duration(args.drain, "--drain")
    for item in args.tcp or []:
        name, hp = C.parse_endpoint_flag(item, "--tcp")
        cfg.tcp[name] = hp
    for item in args.http or []:
        name, sep, route = item.partition("=")
        if not sep or not route:
            raise ConfigError(f"--http {item!r}: expected NAME=HOSTNAME[/PREFIX]")
        cfg.http[name] = route
    if args.site:
        from relayd.control.zerotrust import ZtConfig

        cfg.zerotrust = cfg.zerotrust or ZtConfig()
        cfg.zerotrust.site = C._check_name(args.site, "--site")
    return cfg.validate()


def cmd_serve(args: argparse.Namespace) -> int:
    from relayd import log as rlog
    from relayd.net import run
    from relayd.gateway.node import RelayNode

    # A SIGHUP from the start on (a reload right after a start, a log rotation)
    # is kept for when the relay is up: its default action would end the process.
    early_hup: list = []
    signal.signal(signal.SIGHUP, lambda *_: early_hup.append(True))
    cfg = serve_config(args)
    rlog.setup(cfg.log_level)
    logging.getLogger("relayd").info("starting relay", extra={"version": relayd.__version__, **_build.report()})

    async def run_relay() -> int:
        node = RelayNode(cfg)
        stop = asyncio.Event()
        _signals_to(stop)
        started, asked = False, False

        def reload() -> None:
            nonlocal asked
            if not started:  # a SIGHUP during the start: applied once it is done
                asked = True
                return
            try:
                new = serve_config(args)  # the config file again, with the same flags on top
            except (ConfigError, OSError) as exc:
                logging.getLogger("relayd").error("reload: the configuration does not load; keeping the running one: %s",
                                                  exc)
                return
            asyncio.get_running_loop().create_task(node.reload(new))

        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        await node.start()
        started = True
        if asked or early_hup:
            reload()
        await stop.wait()
        await node.stop(drain=cfg.drain)
        return 0

    return run(run_relay())


# -- agent ---------------------------------------------------------------------------


def agent_config(args: argparse.Namespace):
    from relayd import config as C

    cfg = C.load_agent(Path(args.config) if args.config else None)
    if args.data:
        cfg.data = Path(args.data)
    if args.join:
        cfg.join = args.join
    if args.transport:
        cfg.transport = args.transport
    if args.proxy:
        cfg.proxy = args.proxy
    if args.drain is not None:
        cfg.drain = C.parse_duration(args.drain, "--drain")
    if args.device_api:
        cfg.device_api = C.parse_hostport(args.device_api, "--device-api", need_host=True)
    for k in ("otp", "est", "pin"):
        if getattr(args, k, None):
            setattr(cfg, k, getattr(args, k))
    for item in args.endpoint or []:
        name, hp = C.parse_endpoint_flag(item, "--endpoint")
        cfg.endpoints[name] = hp
    if args.site:
        site, sep, nets = args.site.partition("=")
        if not sep:
            raise ConfigError(f"--site {args.site!r}: expected SITE=CIDR[,CIDR...]")
        cfg.site = C._check_name(site, "--site")
        cfg.site_networks = C.parse_networks(nets, "--site")
    return cfg.validate()


def cmd_agent(args: argparse.Namespace) -> int:
    from relayd import log as rlog
    from relayd.agent import AgentNode
    from relayd.net import run

    cfg = agent_config(args)
    rlog.setup(cfg.log_level)
    logging.getLogger("relayd").info("starting agent", extra={"version": relayd.__version__, **_build.report()})

    async def run_agent() -> int:
        node = AgentNode(cfg)
        stop = asyncio.Event()
        _signals_to(stop)
        await node.start()
        waiter = asyncio.ensure_future(node.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        await node.stop(drain=cfg.drain if stop.is_set() else 0.0)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
            raise waiter.exception()
        return 0

    return run(run_agent())


# -- hc forward ----------------------------------------------------------------------


def cmd_hc(args: argparse.Namespace) -> int:
    """``relayd hc forward``: TCP over a hybrid connection (relayd.client.forward)."""
    from relayd import log as rlog
    from relayd.client import forward, hybrid
    from relayd.config import parse_hostport
    from relayd.net import run

    rlog.setup("info")
    cs = hybrid.parse_connection_string(args.connection_string or os.environ.get("RELAYD_HC_CONNECTION", ""))
    kw = {"ssl": ssl.create_default_context(cafile=args.ca) if args.ca else None, "proxy": args.proxy}
    path = args.path or cs.entity_path
    if not path:
        raise ConfigError("name the hybrid connection: --path, or EntityPath in the connection string")
    if bool(args.R) == bool(args.L):
        raise ConfigError("give one of -R HOST:PORT (the listener side) or -L [HOST:]PORT (the sender side)")

    async def main() -> int:
        stop = asyncio.Event()
        _signals_to(stop)
        if args.R:
            host, port = parse_hostport(args.R, "-R", need_host=True)
            listener = forward.remote_listener(cs, host, port, path=path, **kw)
            task = asyncio.ensure_future(listener.run())
            await asyncio.wait({task, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
            await listener.close()
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
        else:
            host, port = parse_hostport(args.L if ":" in args.L else ":" + args.L, "-L")
            server = await forward.local_port(cs, host or "127.0.0.1", port, path=path, **kw)
            bound = server.sockets[0].getsockname()
            print(f"forwarding {bound[0]}:{bound[1]} to hybrid connection {path}", flush=True)
            await stop.wait()
            server.close()
        return 0

    try:
        return run(main())
    except hybrid.HandshakeRefused as exc:
        return _fail(f"the relay refused the listener: {exc}", 1)


# -- admin ---------------------------------------------------------------------------


def cmd_admin(args: argparse.Namespace) -> int:
    """`relayd admin ...`, on a data directory or a remote relay's API
    (relayd.cli_admin)."""
    return cli_admin.run(args)


# -- demo (the README's first command) -------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from relayd.demo import run_demo
    from relayd.net import run

    logging.basicConfig(level=logging.CRITICAL)
    print("\n".join(version_lines()) + "\n")
    return run(run_demo(once=args.once, mib=args.mib))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Self-hosted secure relay and zero-trust access gateway.")
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("version", help="versions of relayd, Python, uvloop, OpenSSL and which builds are active")
    v.set_defaults(func=cmd_version)

    s = sub.add_parser("serve", help="run a relay node")
    s.add_argument("--config", help="TOML config file")
    s.add_argument("--data", help="data directory (created on first start: CA, database)")
    s.add_argument("--agents", help="HOST:PORT where agents dial in (TLS)")
    s.add_argument("--public", help="agent address written into join tokens (default: --agents)")
    s.add_argument("--hostname", help="name on the relay's TLS certificate")
    s.add_argument("--redis", metavar="URL", help="share device events and presence with other relays through "
                   "this Redis (redis://HOST:PORT[/DB]); default: in this process only")
    s.add_argument("--metrics", help="HOST:PORT for Prometheus /metrics")
    s.add_argument("--tcp", action="append", metavar="NAME=HOST:PORT", help="public TCP endpoint (repeatable)")
    s.add_argument("--https", help="HOST:PORT of the HTTPS listener (HTTP endpoints; agents over WebSocket)")
    s.add_argument("--http", action="append", metavar="NAME=HOSTNAME[/PREFIX]",
                   help="HTTP endpoint on the HTTPS port, routed by Host and path prefix (repeatable)")
    s.add_argument("--grace", help="hold public connections this long while no agent serves them (default 0s)")
    s.add_argument("--agent-cert-ttl", help="lifetime of agent certificates (default 30d)")
    s.add_argument("--drain", help="on stop, let open streams finish this long after GoAway (default 10s)")
    s.add_argument("--site", help="be the zero-trust gateway of this site (docs/zero-trust.md)")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("agent", help="run an agent: dial out to the relay, serve local endpoints")
    a.add_argument("--config", help="TOML config file")
    a.add_argument("--data", help="agent data directory (identity)")
    a.add_argument("--join", help="join token from `relayd admin join-token` (first start only)")
    a.add_argument("--endpoint", action="append", metavar="NAME=HOST:PORT", help="local service (repeatable)")
    a.add_argument("--transport", choices=["tls", "wss", "auto"], help="agent link transport (default tls)")
    a.add_argument("--proxy", help="forward proxy URL")
    a.add_argument("--drain", help="on stop, let open streams finish this long after GoAway (default 10s)")
    a.add_argument("--site", metavar="SITE=CIDR[,CIDR]", help="reach these networks for a zero-trust site's users")
    a.add_argument("--device-api", metavar="127.0.0.1:PORT",
                   help="serve the device API (/api/v1/device/...) here, carried through the tunnel (docs/device-cloud.md)")
    a.add_argument("--otp", help="enroll this device over EST with a provisioning OTP (first start only; with --est)")
    a.add_argument("--est", metavar="https://HOST[:PORT]", help="the relay's EST address (with --otp)")
    a.add_argument("--pin", metavar="SHA256", help="the relay CA's SHA-256 that came with the OTP")
    a.set_defaults(func=cmd_agent)

    ad = sub.add_parser("admin", help="manage a relay: its data directory (--data) or its admin API (--api URL)")
    cli_admin.add_target(ad, top=True)
    asub = ad.add_subparsers(dest="admin", required=True)
    jt = asub.add_parser("join-token", help="print a single-use join token")
    jt.add_argument("--endpoint", action="append", metavar="NAME",
                    help="restrict the agent to this endpoint (repeatable)")
    jt.add_argument("--ttl", default="15m", help="validity (default 15m)")
    jt.add_argument("--transport", choices=["tls", "wss"], default="tls",
                    help="the address the token names: the agents port (tls) or the HTTPS port (wss)")
    jl = asub.add_parser("join-tokens", help="list join tokens (never their secrets) and the agents they enrolled")
    jr = asub.add_parser("revoke-join-token", help="revoke an unused join token")
    jr.add_argument("id")
    cc = asub.add_parser("ca-cert", help="print the relay's CA certificate (PEM)")
    ag = asub.add_parser("agents", help="list agents (with an ID: that agent in detail)")
    ag.add_argument("id", nargs="?", help="one agent")
    rv = asub.add_parser("revoke-agent", help="revoke an agent: cuts its live link, refuses its certificate")
    rv.add_argument("id")
    ep = asub.add_parser("endpoints", help="list endpoints with the agents serving them and their traffic")
    st = asub.add_parser("status", help="the relay: addresses, CA pin, agents online, hybrid listeners")
    hc = asub.add_parser("hc", help="hybrid connections (Azure Relay) and their shared access rules")
    hsub = hc.add_subparsers(dest="hc", required=True)
    c = hsub.add_parser("create", help="create a hybrid connection")
    c.add_argument("path", help="its path, e.g. orders or a/b/c")
    c.add_argument("--no-client-auth", action="store_true", help="senders need no token")
    c.add_argument("--no-websocket", action="store_true", help="refuse WebSocket senders")
    c.add_argument("--no-http", action="store_true", help="refuse HTTP-mode requests")
    c.add_argument("--response-timeout", help="a listener's HTTP answer deadline (default 60s)")
    c.add_argument("--control-threshold", type=int, help="largest body on the control channel (default 65536)")
    hl = hsub.add_parser("list", help="list hybrid connections and rules (never keys)")
    hd = hsub.add_parser("delete", help="delete a hybrid connection and its rules")
    hd.add_argument("path")
    hr = hsub.add_parser("rule", help="shared access rules of the node (no PATH) or of a hybrid connection")
    rsub = hr.add_subparsers(dest="rule", required=True)
    for name, what in (("add", "add a rule (prints its key)"), ("rotate", "new primary key; the old one stays "
                       "valid as the secondary"), ("remove", "remove a rule")):
        r = rsub.add_parser(name, help=what)
        r.add_argument("path", nargs="?", help="the hybrid connection (none: the node)")
        r.add_argument("--name", required=True)
        cli_admin.add_target(r)
        if name != "remove":
            r.add_argument("--key", help="the key to use (default: 32 random bytes, Base64)")
        if name == "add":
            r.add_argument("--rights", required=True, help="some of listen,send,manage")
    cs = hsub.add_parser("connection-string", help="print a connection string, as Azure's portal does")
    cs.add_argument("path", nargs="?", help="the hybrid connection (none: a node rule)")
    cs.add_argument("--name", required=True, help="the rule")
    cs.add_argument("--secondary", action="store_true", help="with the rule's secondary key")
    cs.add_argument("--host", help="HOST[:PORT] to name (default: the relay's HTTPS address)")
    for each in (c, hl, hd, cs):
        cli_admin.add_target(each)
    op = asub.add_parser("otp", help="device provisioning OTPs (docs/device-cloud.md)")
    osub = op.add_subparsers(dest="otp", required=True)
    oc = osub.add_parser("create", help="print a new OTP for one device (its details on stderr)")
    oc.add_argument("--name", help="the device's name (with --count: the names' prefix, NAME1, NAME2, ...)")
    oc.add_argument("--count", type=int, default=1, help="this many OTPs, one per line (at most 1000 at a time)")
    oc.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label of the device (repeatable)")
    oc.add_argument("--ttl", default="24h", help="lifetime, at most 7d (default 24h)")
    oc.add_argument("--json", action="store_true", help="print the whole answer as JSON, as the API gives it")
    ol = osub.add_parser("list", help="list OTPs and their state (never the codes)")
    orv = osub.add_parser("revoke", help="revoke an unused OTP")
    orv.add_argument("id")
    for each in (oc, ol, orv):
        cli_admin.add_target(each)
    ak = asub.add_parser("api-key", help="the admin API key (docs/api.md)")
    aks = ak.add_subparsers(dest="api_key", required=True)
    x = aks.add_parser("rotate", help="print a new admin API key; the old one stops working at once")
    for each in (jt, jl, jr, cc, ag, rv, ep, st, x):
        cli_admin.add_target(each)
    cli_zerotrust.add_admin_parsers(asub)
    ad.set_defaults(func=cmd_admin)
    cli_zerotrust.add_client_parsers(sub)

    hcp = sub.add_parser("hc", help="hybrid connections as a client")
    hcs = hcp.add_subparsers(dest="hc", required=True)
    fw = hcs.add_parser("forward", help="TCP over a hybrid connection (as azure-relay-bridge)")
    fw.add_argument("--connection-string", help="Endpoint=sb://...;SharedAccessKeyName=...;SharedAccessKey=..."
                    " (default: $RELAYD_HC_CONNECTION)")
    fw.add_argument("--path", help="the hybrid connection (default: the connection string's EntityPath)")
    fw.add_argument("-R", metavar="HOST:PORT", help="listener side: senders' connections go to HOST:PORT")
    fw.add_argument("-L", metavar="[HOST:]PORT", help="sender side: connections to this local port cross")
    fw.add_argument("--ca", help="CA certificate (PEM) to trust for the relay (default: the system's)")
    fw.add_argument("--proxy", help="http:// forward proxy (default: $HTTPS_PROXY)")
    fw.set_defaults(func=cmd_hc)

    d = sub.add_parser("demo", help="relay + enrolled agent + sample services on loopback, traffic through the tunnel")
    d.add_argument("--once", action="store_true", help="exit after the traffic instead of waiting for Ctrl-C")
    d.add_argument("--mib", type=int, default=256, help="MiB echoed through the tunnel (default 256)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except AuthError as exc:
        return _fail(str(exc), 1)
    except TemporaryError as exc:
        return _fail(str(exc), EX_TEMPFAIL)
    except RelaydError as exc:
        return _fail(str(exc) or type(exc).__name__, 1)
    except OSError as exc:
        return _fail(_os_error(exc), 1)
    except sqlite3.Error as exc:
        return _fail(f"database: {exc}", 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
