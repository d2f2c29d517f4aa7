"""Interoperability with hashicorp/yamux itself (Debian's Go package).

A small Go program (yamuxpeer/main.go, built offline in GOPATH mode against
/usr/share/gocode) and relayd's MuxConnection talk over a real loopback TCP
socket, in both roles. Each side opens 100 streams at once and serves the
other's; 64 MiB move each way, checked with SHA-256 (protocol.py describes
the exchange). Pings go both ways, GoAway is sent by one side and must be
seen by the other, and resets are checked in both directions as far as the
Go snapshot allows (it has no public stream reset: it sends RST only when its
accept backlog overflows, which a test provokes).

Known defects of that 2019 snapshot (fixed upstream in v0.1.2), told apart
from relayd defects by construction: a Go stream that has sent FIN sees a
premature EOF as soon as its buffer is empty, so acceptors read to EOF before
writing and the Go opener relies on the known reply length; and a FIN riding
on a data frame can make a Go reader drop that frame's data, which is why
relayd always sends FIN in a frame of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from relayd.errors import SessionClosedError, StreamResetError
from relayd.net import mux, run
from tests.interop import gobuild, protocol
from tests.waiting import until

pytestmark = pytest.mark.interop

STREAMS = 100
BYTES_PER_STREAM = (64 * 1024 * 1024) // STREAMS + 1  # >= 64 MiB each way in all
DEADLINE = 240.0


@pytest.fixture(scope="session")
def go_peer(tmp_path_factory):
    if not gobuild.go_available():
        pytest.fail(
            "Go and golang-github-hashicorp-yamux-dev are needed (the test command "
            "scripts/test.sh installs them): apt-get install golang-go golang-github-hashicorp-yamux-dev"
        )
    return gobuild.build_peer(tmp_path_factory.mktemp("yamuxpeer"))


class GoProcess:
    """The Go peer as a child process, stopped by PID however the test ends."""

    def __init__(self, args):
        self.args = args
        self.proc = None

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        return self

    async def first_line(self):
        return (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode().strip()

    async def summary(self, timeout=DEADLINE):
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        assert lines, f"no summary from Go peer; stderr:\n{err.decode()[-3000:]}"
        result = json.loads(lines[-1])
        result["_returncode"] = self.proc.returncode
        result["_stderr"] = err.decode()[-3000:]
        return result

    def kill(self):
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def drive_python_side(conn, *, open_streams, nbytes, expect_accepted, send_goaway, seed_base):
    """relayd's half: open streams, serve the peer's, ping, then GoAway or await it."""
    loop = asyncio.get_running_loop()
    served, serve_tasks = [], []

    async def serve_one(st):
        served.append(await protocol.run_acceptor(st))

    async def accept_loop():
        while True:
            try:
                st = await conn.accept_stream()
            except SessionClosedError:
                return
            serve_tasks.append(loop.create_task(serve_one(st)))

    acceptor = loop.create_task(accept_loop())

    async def open_one(i):
        st = await conn.open_stream()
        return await protocol.run_opener(st, seed_base + 2 * i, nbytes)

    rtts = [await conn.ping(timeout=10) for _ in range(3)]
    opened = await asyncio.gather(*(open_one(i) for i in range(open_streams)))
    await until(lambda: sum(1 for s in served if s["op"] == "E") >= expect_accepted, 60,
                "the Go peer's streams were not all served")
    if send_goaway:
        conn.go_away()
        # The Go peer notices (OpenStream -> ErrRemoteGoAway) and hangs up.
        await asyncio.wait_for(asyncio.shield(conn.closed_future), 60)
    else:
        await until(lambda: conn.session.remote_go_away is not None, 60, "the Go peer sent no GoAway")
        with pytest.raises(SessionClosedError):
            await conn.open_stream()
        await asyncio.gather(*serve_tasks)
        await conn.close()
    acceptor.cancel()
    return {"opened": opened, "served": [s for s in served if s["op"] == "E"], "rtts": rtts}


def check_go(summary, *, opened, accepted):
    assert summary["errors"] == [], summary
    assert summary["checksum_failures"] == 0, summary
    assert summary["streams_opened_ok"] == opened, summary
    assert summary["streams_accepted_ok"] >= accepted, summary
    assert summary["pings_ok"] >= 3, summary
    assert summary["ok"] and summary["_returncode"] == 0, summary


def test_go_dials_relayd_listens(go_peer):
    async def main():
        got = asyncio.get_running_loop().create_future()
        server = await mux.serve("127.0.0.1", 0, lambda c: got.done() or got.set_result(c))
        port = server.sockets[0].getsockname()[1]
        go = await GoProcess([
            str(go_peer), "-mode", "dial", "-addr", f"127.0.0.1:{port}",
            "-streams", str(STREAMS), "-bytes", str(BYTES_PER_STREAM), "-timeout", str(DEADLINE),
        ]).start()
        try:
            conn = await asyncio.wait_for(got, 30)
            py = await asyncio.wait_for(drive_python_side(
                conn, open_streams=STREAMS, nbytes=BYTES_PER_STREAM, expect_accepted=STREAMS,
                send_goaway=True, seed_base=7 << 40), DEADLINE)
            summary = await go.summary()
        finally:
            go.kill()
            server.close()
        check_go(summary, opened=STREAMS, accepted=STREAMS)
        assert summary["goaway_seen"], summary
        assert len(py["opened"]) == STREAMS and len(py["served"]) == STREAMS
        moved = sum(s["bytes_sent"] for s in py["opened"]) + sum(s["bytes_sent"] for s in py["served"])
        assert moved >= 64 * 1024 * 1024 * 2 // 2
        assert summary["bytes_received"] >= 64 * 1024 * 1024
        assert summary["bytes_sent"] >= 64 * 1024 * 1024

    run(main())


def test_relayd_dials_go_listens(go_peer):
    async def main():
        go = await GoProcess([
            str(go_peer), "-mode", "listen", "-addr", "127.0.0.1:0",
            "-streams", str(STREAMS), "-bytes", str(BYTES_PER_STREAM), "-goaway",
            "-expect-accepted", str(STREAMS), "-timeout", str(DEADLINE),
        ]).start()
        try:
            line = await go.first_line()
            assert line.startswith("LISTEN "), line
            host, port = line.split()[1].rsplit(":", 1)
            conn = await mux.connect(host, int(port))
            py = await asyncio.wait_for(drive_python_side(
                conn, open_streams=STREAMS, nbytes=BYTES_PER_STREAM, expect_accepted=STREAMS,
                send_goaway=False, seed_base=9 << 40), DEADLINE)
            summary = await go.summary()
        finally:
            go.kill()
        check_go(summary, opened=STREAMS, accepted=STREAMS)
        assert summary["goaway_sent"], summary
        assert conn.session.remote_go_away == 0
        assert len(py["opened"]) == STREAMS and len(py["served"]) == STREAMS

    run(main())


def test_resets_both_ways(go_peer):
    """relayd resets Go's probe streams (Go must see a reset); Go, which has no
    public reset, refuses relayd's streams past its accept backlog with RST."""

    async def main():
        go = await GoProcess([
            str(go_peer), "-mode", "listen", "-addr", "127.0.0.1:0",
            "-streams", "0", "-reset-probes", "5", "-expect-resets",
            "-backlog", "4", "-accept-delay", "1.5s", "-goaway", "-expect-accepted", "4",
            "-timeout", "60",
        ]).start()
        try:
            line = await go.first_line()
            host, port = line.split()[1].rsplit(":", 1)
            conn = await mux.connect(host, int(port))
            loop = asyncio.get_running_loop()
            probes = []

            async def accept_loop():
                while True:
                    try:
                        st = await conn.accept_stream()
                    except SessionClosedError:
                        return
                    probes.append(loop.create_task(protocol.run_acceptor(st)))

            acc = loop.create_task(accept_loop())

            async def open_one(i):
                st = await conn.open_stream()
                try:
                    return await protocol.run_opener(st, 1000 + i, 4096)
                except StreamResetError:
                    return "reset"

            results = await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(30))), 60)
            await until(lambda: conn.session.remote_go_away is not None, 60, "the Go peer sent no GoAway")
            probe_results = await asyncio.gather(*probes)
            await conn.close()
            acc.cancel()
            summary = await go.summary(60)
        finally:
            go.kill()
        resets = results.count("reset")
        ok = [r for r in results if r != "reset"]
        assert resets + len(ok) == 30
        assert len(ok) >= 4 and resets >= 20, (len(ok), resets)
        assert summary["backlog_rejected"] == resets, summary
        assert sum(1 for p in probe_results if p["op"] == "R") == 5
        assert summary["reset_probes_reset"] == 5, summary
        assert summary["errors"] == [], summary

    run(main())
