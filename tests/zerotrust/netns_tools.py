"""Helpers the TUN-mode tests run inside their network namespaces
(`ip netns exec NS python -m tests.zerotrust.netns_tools ...`):

  serve ADDR:PORT...      TCP and UDP echo on each address (until killed)
  tcp HOST PORT SIZE      send SIZE random bytes, read them back; prints
                          "ok SECONDS" or "error ERRNO-NAME SECONDS"
  udp HOST PORT           one datagram echoed; "ok" or "timeout"
  ping HOST               one ICMP echo (raw socket); "ok" or "timeout"
  hold HOST PORT SECONDS  an echo exchange every 50 ms; prints "up" once
                          the first answer is back, then "cut SECONDS"
                          when the flow stops answering (or "held")
  latency HOST PORT N [SOCKS]
                          N new connections (through the SOCKS5 proxy
                          HOST:PORT if given), each timed from connect()
                          to its first echoed byte; prints the seconds as
                          JSON
"""

import errno
import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time


class _Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Udp(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        sock.sendto(data, self.client_address)


def serve(addrs):
    for a in addrs:
        host, port = a.rsplit(":", 1)
        for cls, handler in ((socketserver.ThreadingTCPServer, _Tcp), (socketserver.ThreadingUDPServer, _Udp)):
            cls.allow_reuse_address = True
            cls.daemon_threads = True
            srv = cls((host, int(port)), handler)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("serving", flush=True)
    while True:
        time.sleep(3600)


def tcp(host, port, size):
    t0 = time.monotonic()
    payload = os.urandom(size)
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.settimeout(10)
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        got = bytearray()
        while len(got) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        s.close()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno, "timeout") if exc.errno else "timeout"
        print(f"error {name} {time.monotonic() - t0:.2f}")
        return
    print(f"ok {time.monotonic() - t0:.2f}" if bytes(got) == payload else f"error corrupt {len(got)}")


def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    msg = os.urandom(512)
    for _ in range(3):
        s.sendto(msg, (host, port))
        try:
            data, _ = s.recvfrom(2048)
            if data == msg:
                print("ok")
                return
        except (socket.timeout, ConnectionRefusedError):
            pass
    print("timeout")


def _icmp_checksum(b):
    s = sum(struct.unpack(f">{len(b) // 2}H", b))
    s = (s & 0xFFFF) + (s >> 16)
    s += s >> 16
    return ~s & 0xFFFF


def ping(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    body = b"relayd-tun-ping!"
    head = struct.pack(">BBHHH", 8, 0, 0, ident, 1)
    pkt = struct.pack(">BBHHH", 8, 0, _icmp_checksum(head + body), ident, 1) + body
    deadline = time.monotonic() + 5
    s.sendto(pkt, (host, 0))
    while time.monotonic() < deadline:
        r, _, _ = select.select([s], [], [], deadline - time.monotonic())
        if not r:
            break
        data, _ = s.recvfrom(2048)
        hl = (data[0] & 15) * 4
        if data[hl] == 0 and struct.unpack(">H", data[hl + 4:hl + 6])[0] == ident:
            print("ok")
            return
    print("timeout")


def hold(host, port, seconds):
    s = socket.create_connection((host, port), timeout=5)
    s.settimeout(0.3)
    up = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            s.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                chunk = s.recv(100 - len(got))
                if not chunk:
                    raise OSError("closed")
                got += chunk
        except OSError:
            print(f"cut {time.monotonic():.3f}", flush=True)
            return
        if up is None:
            up = time.monotonic()
            print("up", flush=True)
        time.sleep(0.05)
    print("held", flush=True)


def latency(host, port, n, socks=None):
    import json

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        if socks:
            sh, sp = socks.rsplit(":", 1)
            s = socket.create_connection((sh, int(sp)), timeout=10)
            s.sendall(b"\x05\x01\x00")
            s.recv(2)
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
            reply = b""
            while len(reply) < 10:
                reply += s.recv(10 - len(reply))
            if reply[1] != 0:
                raise SystemExit(f"SOCKS refused: {reply[1]}")
        else:
            s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise SystemExit("no echo")
        out.append(time.perf_counter() - t0)
        s.close()
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(args)
    elif cmd == "tcp":
        tcp(args[0], int(args[1]), int(args[2]))
    elif cmd == "udp":
        udp(args[0], int(args[1]))
    elif cmd == "ping":
        ping(args[0])
    elif cmd == "latency":
        latency(args[0], int(args[1]), int(args[2]), args[3] if len(args) > 3 else None)
    elif cmd == "hold":
        hold(args[0], int(args[1]), float(args[2]))
