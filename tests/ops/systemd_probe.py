"""Run inside the systemd containers of tests/ops/test_container.py, by Debian's python3 (stdlib only).

    python3 systemd_probe.py echo PORT
        a TCP echo service on 127.0.0.1:PORT (the agent's local service)
    python3 systemd_probe.py transfer PORT BYTES [COMMAND ...]
        send BYTES random bytes to 127.0.0.1:PORT and read them back; when a
        COMMAND is given, run it once half of the bytes have come back (on the
        same open connection: `systemctl reload relayd`). Prints one JSON line:
        {"ok": ..., "sent": ..., "received": ..., "seconds": ..., "command_rc": ...}
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

CHUNK = 64 * 1024


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(CHUNK):
            self.request.sendall(data)


def echo(port: int) -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Echo) as server:
        server.serve_forever()


def transfer(port: int, size: int, command: list[str]) -> dict:
    payload = os.urandom(size)
    t0 = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    resume = threading.Event()
    if not command:
        resume.set()

    def send() -> None:
        view = memoryview(payload)
        for i in range(0, size, CHUNK):
            if i >= size // 2:
                resume.wait(60)  # nothing more is sent while the command runs
            sock.sendall(view[i:i + CHUNK])
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = hashlib.sha256()
    received, rc = 0, None
    while received < size:
        data = sock.recv(CHUNK)
        if not data:
            break
        got.update(data)
        received += len(data)
        if command and rc is None and received >= size // 2:
            rc = subprocess.run(command, timeout=60).returncode
            resume.set()
    sender.join(60)
    sock.close()
    return {"ok": received == size and got.digest() == hashlib.sha256(payload).digest(), "sent": size,
            "received": received, "seconds": round(time.monotonic() - t0, 3), "command_rc": rc}


def main(argv: list[str]) -> int:
    if argv[0] == "echo":
        echo(int(argv[1]))
    elif argv[0] == "transfer":
        result = transfer(int(argv[1]), int(argv[2]), argv[3:])
        print(json.dumps(result))
        return 0 if result["ok"] else 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
