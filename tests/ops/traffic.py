"""The traffic of the operations tests: a TCP echo service and a
SHA-256-checked transfer through it. Standard library only, so that the
same file serves on the host (tests/ops/test_container.py,
tests/ops/test_arm64.py import it) and, copied in, inside containers with
nothing but Debian's python3 (the systemd test runs it there):

    python3 traffic.py echo PORT
        a TCP echo service on 127.0.0.1:PORT, until killed
    python3 traffic.py transfer PORT BYTES [COMMAND ...]
        send BYTES random bytes to 127.0.0.1:PORT and read them back; with a
        COMMAND, run it once half of the bytes have come back, on the same
        open connection (`systemctl reload relayd`), and send the rest after
        it. Prints transfer()'s result as one JSON line; exit 0 if intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

CHUNK = 1 << 16


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.settimeout(120)
        while data := sock.recv(CHUNK):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


class EchoService:
    """A TCP echo service on 127.0.0.1:``port`` (0: any free port), one
    thread per connection; its ``port`` while in a ``with`` block."""

    def __init__(self, port: int = 0) -> None:
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._srv = socketserver.ThreadingTCPServer(("127.0.0.1", port), _Echo, bind_and_activate=False)
        self._srv.daemon_threads = True

    def __enter__(self) -> "EchoService":
        self._srv.server_bind()
        self._srv.server_activate()
        self.port = self._srv.server_address[1]
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(5)


def transfer(port: int, size: int, timeout: float = 120, midway: list[str] | None = None) -> dict:
    """Send ``size`` random bytes to 127.0.0.1:``port`` (an echo service
    through the tunnel) while reading the echo. With ``midway``, that command
    runs once half has come back and the rest is sent after it. Returns
    {"ok": SHA-256 and length equal, "received", "seconds", "midway_rc"}."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    received, rc = 0, None
    resume = threading.Event()
    if not midway:
        resume.set()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)

        def send() -> None:
            done = 0
            while done < size:
                if done >= size // 2:
                    resume.wait(timeout)
                chunk = os.urandom(min(size - done, CHUNK))
                sent.update(chunk)
                sock.sendall(chunk)
                done += len(chunk)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while data := sock.recv(1 << 18):
                got.update(data)
                received += len(data)
                if midway and rc is None and received >= size // 2:
                    rc = subprocess.run(midway, timeout=timeout).returncode
                    resume.set()
        except (ConnectionError, socket.timeout):
            pass
        sender.join(timeout)
    return {"ok": received == size and sent.digest() == got.digest(), "received": received,
            "seconds": round(time.monotonic() - t0, 3), "midway_rc": rc}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "echo":
        with EchoService(int(argv[1])):
            threading.Event().wait()
    if len(argv) >= 3 and argv[0] == "transfer":
        result = transfer(int(argv[1]), int(argv[2]), midway=argv[3:] or None)
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
