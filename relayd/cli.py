"""The ``relayd`` command line."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import ssl
import sys
import time

import relayd
from relayd import _build


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
    print("\n".join(version_lines()))
    return 0 if "MISSING" not in " ".join(version_lines()) else 1


async def _demo(streams: int, mib: int, chunk: int) -> dict:
    """A yamux session over a real loopback socket, echoing through N streams."""
    from relayd.net import mux

    loop = asyncio.get_running_loop()

    async def echo_service(st: mux.MuxStream) -> None:
        while True:
            data = await st.read(chunk)
            if not data:
                break
            await st.write(data)
        st.write_eof()

    server_conn = loop.create_future()
    server = await mux.serve("127.0.0.1", 0, server_conn.set_result, on_stream=echo_service)
    port = server.sockets[0].getsockname()[1]
    client = await mux.connect("127.0.0.1", port)
    rtt = await client.ping(timeout=5)
    per_stream = mib * 1024 * 1024 // streams
    block = os.urandom(chunk)

    async def one() -> tuple[int, bool]:
        st = await client.open_stream()
        sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()

        async def send() -> None:
            left = per_stream
            while left:
                piece = block[: min(left, chunk)]
                sent_hash.update(piece)
                await st.write(piece)
                left -= len(piece)
            st.write_eof()

        async def recv() -> int:
            n = 0
            while True:
                data = await st.read(chunk)
                if not data:
                    return n
                got_hash.update(data)
                n += len(data)

        _, n = await asyncio.gather(send(), recv())
        return n, sent_hash.digest() == got_hash.digest()

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    results = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await client.close()
    server.close()
    await server.wait_closed()
    moved = sum(n for n, _ in results)
    return {
        "port": port,
        "streams": streams,
        "bytes_each_way": moved,
        "verified": all(ok for _, ok in results),
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "rtt_us": rtt * 1e6,
    }


def cmd_demo(args: argparse.Namespace) -> int:
    from relayd.net import run

    print("\n".join(version_lines()))
    print(
        f"\ndemo: one yamux session over a loopback TCP socket; {args.streams} streams "
        f"echo {args.mib} MiB through an echo service behind the session ..."
    )
    res = run(_demo(args.streams, args.mib, args.chunk))
    gbit = res["bytes_each_way"] * 2 * 8 / res["seconds"] / 1e9
    print(
        f"  session on 127.0.0.1:{res['port']}, ping RTT {res['rtt_us']:.0f} us\n"
        f"  {res['streams']} streams, {res['bytes_each_way'] / 2**20:.0f} MiB each way in "
        f"{res['seconds']:.2f} s = {gbit:.2f} Gbit/s through the mux (both directions, one process "
        f"doing both ends), {res['cpu_seconds'] / (res['bytes_each_way'] * 2 / 1e9):.2f} CPU s/GB\n"
        f"  SHA-256 of every stream checked both ways: {'OK' if res['verified'] else 'MISMATCH'}"
    )
    return 0 if res["verified"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Self-hosted secure relay and zero-trust access gateway.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("version", help="versions of relayd, Python, uvloop, OpenSSL and which builds are active")
    v.set_defaults(func=cmd_version)
    d = sub.add_parser("demo", help="stream data through a yamux session over a loopback socket")
    d.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    d.add_argument("--mib", type=int, default=256, help="MiB echoed in total (default 256)")
    d.add_argument("--chunk", type=int, default=256 * 1024, help="write size in bytes")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
