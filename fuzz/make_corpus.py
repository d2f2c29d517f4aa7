"""Write the seed corpus of every harness: fuzz/corpus/<harness>/seed-*.

Seeds are valid and near-valid inputs (real frames, real requests and
responses, and the classic ways each protocol goes wrong), in the harnesses'
input format (fuzz/harness.py). The output is deterministic: run it after
changing a harness's input format or a seed, and commit the result.

    python fuzz/make_corpus.py           # (re)write the seeds, drop stale seed-* files
    python fuzz/make_corpus.py --check   # exit 1 if the committed seeds differ

Files not named seed-* (crash reproducers added by hand, see
docs/fuzzing.md) are never touched.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack

from fuzz import fuzz_http_request, fuzz_http_response, fuzz_wsconn, fuzz_wsframe, fuzz_yamux
from fuzz.harness import REQUESTS, RESPONSES, script_of
from relayd.core import _wsframe_py as W
from relayd.core import _yamux_py as K
from relayd.core import wire
from relayd.core.framing import encode_message
from tests.core.frames import data, frame, goaway, ping, syn, wnd

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def small_reads(blob: bytes, size: int = 1, last: int = 0) -> list:
    """``blob`` in reads of ``size`` bytes, ``last`` the command after them."""
    pieces = [(blob[i : i + size], 0) for i in range(0, len(blob), size)]
    pieces[-1] = (pieces[-1][0], last)
    return pieces


# --- yamux --------------------------------------------------------------------------------


def yamux_seeds() -> dict:
    Y = fuzz_yamux.COMMANDS.index
    SERVER, CLIENT, TINY = 0, 1, 2
    FIN, RST, ACK, SYN = K.FLAG_FIN, K.FLAG_RST, K.FLAG_ACK, K.FLAG_SYN
    return {
        "open-data-fin": (SERVER, [(syn(1), Y("accept")), (data(1, b"hello"), Y("consume")),
                                   (data(1, b"bye", FIN), Y("send")), (b"", Y("eof")), (b"", Y("flush"))]),
        "we-open-ack-window": (CLIENT, [(b"", Y("open")), (wnd(1, 0, ACK), Y("send-big")),
                                        (wnd(1, 100000), Y("send-big")), (b"", Y("flush-list")),
                                        (data(1, b"reply", FIN), Y("consume")), (b"", Y("eof"))]),
        "ping-pong-goaway": (CLIENT, [(b"", Y("ping")), (ping(1, ACK), Y("flush")), (ping(77), 0),
                                      (goaway(0), Y("open"))]),
        "one-byte-reads": (SERVER, small_reads(syn(1) + data(1, b"abc") + wnd(1, 5) + ping(3), 1, Y("accept"))),
        "header-split-at-11": (SERVER, [(syn(1)[:11], 0), (syn(1)[11:] + data(1, b"xyz")[:5], 0),
                                        (data(1, b"xyz")[5:], Y("accept"))]),
        "payload-in-pieces": (SERVER, [(syn(1), Y("accept")), (data(1, bytes(range(250)))[:112], Y("consume-half")),
                                       (data(1, bytes(range(250)))[112:], Y("consume"))]),
        "peer-reset-then-late-data": (SERVER, [(syn(1), Y("accept")), (data(1, b"abc"), 0),
                                               (wnd(1, 0, RST), Y("consume")), (data(1, b"late"), 0)]),
        "syn-data-rst-in-one-read": (SERVER, [(syn(1) + data(1, b"x") + wnd(1, 0, RST), Y("accept"))]),
        "syn-flood-tiny-limits": (SERVER | TINY, [(b"".join(syn(i) for i in range(1, 14, 2)), Y("flush"))]),
        "ping-flood-tiny-limits": (SERVER | TINY, [(b"".join(ping(i) for i in range(5)), 0)]),
        "window-overflow": (SERVER, [(syn(1), Y("accept")), (wnd(1, 0xFFFFFFFF), 0)]),
        "bad-version": (SERVER, [(b"\x01" + syn(1)[1:], 0)]),
        "unknown-type": (SERVER, [(frame(7, 0, 0, 0), 0)]),
        "unknown-flag": (SERVER, [(frame(K.TYPE_DATA, 0x10, 1, 0), 0)]),
        "syn-and-ack": (SERVER, [(wnd(1, 0, SYN | ACK), 0)]),
        "data-on-stream-zero": (SERVER, [(data(0, b"x"), 0)]),
        "data-beyond-window": (SERVER, [(syn(1) + frame(K.TYPE_DATA, 0, 1, 262145) + b"x" * 20, 0)]),
        "frame-too-large": (SERVER, [(frame(K.TYPE_DATA, 0, 1, 16 * 1024 * 1024 + 1), 0)]),
        "syns-out-of-order-then-reuse": (SERVER, [(syn(5) + syn(3) + syn(1), Y("accept")), (syn(3), 0)]),
        "id-gap-too-large-tiny": (SERVER | TINY, [(syn(101), 0)]),
        "wrong-parity": (SERVER, [(syn(2), 0)]),
        "local-reset-late-data": (SERVER, [(syn(1), Y("accept")), (b"", Y("reset")), (data(1, b"in flight"), 0),
                                           (wnd(1, 10), Y("flush"))]),
        "goaway-then-open": (CLIENT, [(goaway(0), Y("open")), (goaway(5), 0)]),
        "both-fins-then-window": (SERVER, [(syn(1), Y("accept")), (b"", Y("eof")), (data(1, b"x", FIN), 0),
                                           (wnd(1, 10), Y("flush"))]),
        "data-after-fin": (SERVER, [(syn(1) + data(1, b"a", FIN) + data(1, b"b"), 0)]),
        "unexpected-ack": (CLIENT, [(wnd(1, 0, ACK), 0)]),
        "send-view-and-eof": (CLIENT, [(b"", Y("open")), (wnd(1, 0, ACK), Y("send-view")),
                                       (b"", Y("send-eof-bytearray")), (b"", Y("flush-list"))]),
        "rtt-and-consume": (SERVER, [(b"", Y("rtt")), (syn(1), Y("accept")), (data(1, bytes(600)), Y("consume")),
                                     (b"", Y("flush"))]),
        "syn-fin-with-data": (SERVER, [(frame(K.TYPE_DATA, SYN | FIN, 1, 5, b"hello"), Y("accept"))]),
        "we-go-away-then-syn": (SERVER, [(b"", Y("go-away")), (syn(1), Y("flush"))]),
    }


# --- WebSocket ------------------------------------------------------------------------------


def wsframe_seeds() -> dict:
    C = fuzz_wsframe.COMMANDS.index
    CLIENT, SERVER, SMALL = 0, 1, 2
    key = b"\x01\x02\x03\x04"

    def m(op, payload, fin=True):  # a client's frame (masked)
        return W.encode_frame(op, payload, fin, key)

    def u(op, payload, fin=True):  # a server's frame
        return W.encode_frame(op, payload, fin)

    return {
        "text-masked": (SERVER, [(m(1, b"hello"), 0)]),
        "text-unmasked": (CLIENT, [(u(1, b"hello"), 0)]),
        "fragments-with-ping": (SERVER, [(m(1, b"Hel", False) + m(9, b"p") + m(0, b"lo", False), 0),
                                         (m(0, b"!"), 0)]),
        "binary-16-bit-length": (SERVER, [(m(2, bytes(range(256)) + bytes(44)), 0)]),
        "binary-64-bit-length-prefix": (SERVER, [(W.encode_header(2, 70000, True, key) + bytes(100), 0)]),
        "close-code-reason": (SERVER, [(W.encode_close(1001, "going away", key), 0)]),
        "close-empty": (CLIENT, [(u(8, b""), 0)]),
        "close-one-byte": (CLIENT, [(u(8, b"\x03"), 0)]),
        "close-code-1005": (CLIENT, [(u(8, b"\x03\xed"), 0)]),
        "close-reason-not-utf8": (CLIENT, [(u(8, b"\x03\xe8\xff"), 0)]),
        "unmasked-from-client": (SERVER, [(u(2, b"x"), 0)]),
        "masked-from-server": (CLIENT, [(m(2, b"x"), 0)]),
        "utf8-char-across-fragments": (SERVER, [(m(1, b"\xe2", False), 0), (m(0, b"\x82\xac"), 0)]),
        "bad-utf8-across-fragments": (SERVER, [(m(1, b"ok \xe2\x82", False), 0), (m(0, b"\xff"), 0)]),
        "reserved-bits": (CLIENT, [(b"\xc1\x00", 0)]),
        "unknown-opcode": (CLIENT, [(b"\x83\x00", 0)]),
        "fragmented-control": (CLIENT, [(b"\x09\x00", 0)]),
        "control-too-long": (CLIENT, [(b"\x89\x7e\x00\x7e" + bytes(126), 0)]),
        "length-not-shortest": (CLIENT, [(b"\x82\x7e\x00\x05hello", 0)]),
        "length-63-bits": (SERVER, [(b"\x82\xff\x7f" + b"\xff" * 7 + key, 0)]),
        "length-high-bit": (CLIENT, [(b"\x82\xff\x80" + bytes(7), 0)]),
        "continuation-without-start": (CLIENT, [(u(0, b"x"), 0)]),
        "new-message-before-end": (CLIENT, [(u(1, b"a", False) + u(2, b"b"), 0)]),
        "too-big-small-limit": (SERVER | SMALL, [(m(2, bytes(600), False), 0), (m(0, bytes(500)), 0)]),
        "ping-pong-client": (CLIENT, [(u(9, b"are you there") + u(10, b"yes"), 0)]),
        "empty-fragments": (CLIENT, [(u(1, b"", False) + u(0, b"", False) + u(0, b""), 0)]),
        "one-byte-reads": (SERVER, small_reads(m(1, b"split me") + m(10, b""))),
        "feed-other-buffers": (SERVER, [(m(2, b"as a bytearray"), C("feed-bytearray")),
                                        (m(2, b"as a memoryview"), C("feed-view"))]),
        "encoder-side": (CLIENT, [(u(2, bytes(range(37))), C("mask+0")), (u(2, b"abc"), C("mask+3")),
                                  (u(1, "h\u00e9llo".encode()), C("encode-text")),
                                  (u(2, bytes(range(200))), C("encode-binary")), (u(2, bytes(13)), C("mask+1"))]),
    }


def wsconn_seeds() -> dict:
    C = fuzz_wsconn.COMMANDS.index
    CLIENT, SERVER, SMALL, WHOLE = 0, 1, 2, 4
    key = b"\x01\x02\x03\x04"

    def m(op, payload, fin=True):  # a client's frame (masked)
        return W.encode_frame(op, payload, fin, key)

    def u(op, payload, fin=True):  # a server's frame
        return W.encode_frame(op, payload, fin)

    def close(code, reason=b"", masked=True):
        return (m if masked else u)(8, code.to_bytes(2, "big") + reason)

    return {
        "messages-assembled": (SERVER | WHOLE, [(m(1, "h\u00e9llo".encode()) + m(2, bytes(range(40))), 0)]),
        "messages-streamed": (CLIENT, [(u(1, b"one") + u(2, b"two"), 0)]),
        "fragments-with-pings": (SERVER | WHOLE, [(m(1, b"Hel", False) + m(9, b"p") + m(0, b"lo", False), 0),
                                                  (m(10, b"") + m(0, b"!"), C("drain"))]),
        "utf8-char-across-fragments": (CLIENT | WHOLE, [(u(1, b"\xe2", False), 0), (u(0, b"\x82\xac"), 0)]),
        "bad-utf8-across-fragments": (SERVER | WHOLE, [(m(1, b"ok \xe2\x82", False), 0), (m(0, b"\xff"), 0)]),
        "peer-closes": (SERVER | WHOLE, [(close(1001, b"going away"), C("drain"))]),
        "peer-closes-no-code": (CLIENT, [(u(8, b""), C("drain")), (b"", C("eof"))]),
        "peer-closes-mid-message": (SERVER, [(m(2, b"part", False) + close(1000), 0)]),
        "bad-close-code": (SERVER, [(close(1005), 0)]),
        "close-code-out-of-range": (CLIENT, [(close(5000, masked=False), 0)]),
        "close-reason-not-utf8": (SERVER, [(close(1000, b"\xc3"), 0)]),
        "we-close-first": (SERVER | WHOLE, [(b"\x00bye", C("close")), (m(2, b"late data"), 0),
                                            (close(1000), C("drain"))]),
        "we-fail": (CLIENT, [(b"\x02unsupported", C("fail")), (u(2, b"ignored"), 0)]),
        "send-all-kinds": (CLIENT | WHOLE, [(b"text", C("text")), (bytes(range(20)), C("binary")),
                                            (b"first part", C("binary-part")), (b"middle", C("continue")),
                                            (b"last", C("continue-last")), (b"ping!", C("ping")),
                                            (b"pong!", C("pong")), (b"", C("drain-list"))]),
        "send-misuse": (SERVER, [(b"x", C("continue")), (b"ab", C("binary-part")), (b"t", C("text")),
                                 (b"\x08", C("close")), (b"x", C("binary"))]),
        "too-big-small-limit": (SERVER | SMALL | WHOLE, [(m(2, bytes(150), False), 0), (m(0, bytes(160)), 0)]),
        "frame-too-big-small-limit": (CLIENT | SMALL, [(u(2, bytes(201)), 0)]),
        "ping-flood-small-limit": (SERVER | SMALL, [(m(9, bytes(60)) * 6, 0)]),
        "ping-flood-drained": (SERVER | SMALL, [(m(9, bytes(60)) * 3, C("drain")), (m(9, bytes(60)) * 3, C("drain"))]),
        "unmasked-from-client": (SERVER, [(u(2, b"x"), 0)]),
        "masked-from-server": (CLIENT, [(m(2, b"x"), 0)]),
        "text-on-the-agent-link-streamed": (SERVER, [(m(1, b"not binary"), 0)]),
        "eof-mid-message": (SERVER | WHOLE, [(m(2, b"cut", False), C("eof")), (m(2, b"after eof"), 0)]),
        "one-byte-reads": (SERVER | WHOLE, small_reads(m(1, b"split me") + m(9, b"") + close(1000))),
        "feed-other-buffers": (CLIENT, [(u(2, b"as a bytearray"), C("feed-bytearray")),
                                        (u(2, b"as a memoryview"), C("feed-view"))]),
    }


# --- HTTP ---------------------------------------------------------------------------------


def http_request_seeds() -> dict:
    R = fuzz_http_request.COMMANDS

    def respond(i):
        return R.index(("service", RESPONSES[i]))

    def do(name):
        return R.index((name,))

    ok0, ok5, chunked, switching, cont, no_content, close_delim, not_modified = range(8)
    get = b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n"
    post = b"POST /form HTTP/1.1\r\nHost: app.example\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
    chunked_post = (b"POST /up HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: v\r\n\r\n")
    upgrade = REQUESTS[4]
    return {
        "get": (0, [(b"GET /index.html?q=1 HTTP/1.1\r\nHost: app.example\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
                     respond(ok5))]),
        "pipelined-gets": (0, [(get + get.replace(b"/ ", b"/a ") + get.replace(b"/ ", b"/b "), respond(ok0)),
                               (b"", respond(ok5)), (b"", respond(chunked))]),
        "post-content-length-split": (0, [(post, 0), (b"hello", 0), (b" world", respond(ok0))]),
        "post-chunked-extensions-trailers": (0, [(chunked_post[:60], 0), (chunked_post[60:75], 0),
                                                 (chunked_post[75:], respond(ok0))]),
        "chunked-then-pipelined-get": (0, [(chunked_post + get, respond(ok0)), (b"", respond(ok0))]),
        "upgrade-websocket": (0, [(upgrade, respond(switching)), (b"\x81\x85\x01\x02\x03\x04ig`hn", 0),
                                  (b"", do("client_eof")), (b"", do("service_eof"))]),
        "upgrade-refused": (0, [(upgrade, respond(ok5)), (b"more", 0)]),
        "connect-method": (0, [(b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n", 0)]),
        "absolute-form": (0, [(b"GET http://app.example/x?q=1 HTTP/1.1\r\nHost: app.example\r\n\r\n",
                               respond(ok0))]),
        "options-asterisk": (0, [(b"OPTIONS * HTTP/1.1\r\nHost: app.example\r\n\r\n", respond(ok0))]),
        "http10-keep-alive": (0, [(b"GET / HTTP/1.0\r\nHost: app.example\r\nConnection: keep-alive\r\n\r\n",
                                   respond(ok5)), (b"GET /2 HTTP/1.0\r\nHost: app.example\r\n\r\n", respond(ok5))]),
        "http10-without-host": (0, [(b"GET / HTTP/1.0\r\n\r\n", 0)]),
        "expect-continue": (0, [(b"PUT /f HTTP/1.1\r\nHost: app.example\r\nExpect: 100-continue\r\n"
                                 b"Content-Length: 5\r\n\r\n", respond(cont)), (b"hello", respond(ok0))]),
        "forwarding-headers": (0, [(b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 10.0.0.1\r\n"
                                    b"Forwarded: for=1.2.3.4\r\nX-Forwarded-Proto: http\r\nConnection: close, X-Drop\r\n"
                                    b"X-Drop: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n", respond(ok0))]),
        "two-host-headers": (0, [(b"GET / HTTP/1.1\r\nHost: app.example\r\nHost: alt.example\r\n\r\n", 0)]),
        "content-length-and-chunked": (0, [(b"POST / HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 0)]),
        "transfer-encoding-gzip-chunked": (0, [(b"POST / HTTP/1.1\r\nHost: app.example\r\n"
                                                b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 0)]),
        "obs-fold": (0, [(b"GET / HTTP/1.1\r\nHost: app.example\r\nX-A: 1\r\n  folded\r\n\r\n", 0)]),
        "bare-lf": (0, [(b"GET / HTTP/1.1\nHost: app.example\n\n", respond(ok0))]),
        "routes-and-endpoints": (0, [(b"GET /api/v1 HTTP/1.1\r\nHost: app.example\r\n\r\n", respond(ok0)),
                                     (b"GET / HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n", respond(ok0)),
                                     (b"GET /x HTTP/1.1\r\nHost: ALT.example\r\n\r\n", respond(ok0)),
                                     (b"GET / HTTP/1.1\r\nHost: unknown.example\r\n\r\n", 0)]),
        "small-window-post": (4, [(post + b"hello", do("grant")), (b" world", do("grant")),
                                  (b"", respond(ok0))]),
        "no-agent": (1, [(get, 0)]),
        "agent-busy-on-endpoint-change": (2, [(get, respond(ok0)),
                                              (b"GET /api HTTP/1.1\r\nHost: app.example\r\n\r\n", 0)]),
        "head-not-modified": (0, [(b"HEAD / HTTP/1.1\r\nHost: app.example\r\n\r\n", respond(not_modified))]),
        "retry-after-service-closed": (0, [(get, respond(ok0)), (get, do("service_eof"))]),
        "service-reset-before-response": (0, [(get, do("service_reset"))]),
        "gateway-timeout": (0, [(get, do("expire"))]),
        "idle-timeout": (0, [(get, respond(ok0)), (b"", do("expire"))]),
        "client-transport-paused": (0, [(get, do("pause_writing")), (b"", respond(ok5)),
                                        (b"", do("resume_writing"))]),
        "close-delimited-response": (0, [(get, respond(close_delim)), (b"", do("service_eof"))]),
        "no-content": (0, [(get, respond(no_content))]),
        "chunked-capitalised": (0, [(b"POST / HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: Chunked\r\n\r\n"
                                     b"3\r\nabc\r\n0\r\n\r\n", respond(ok0))]),
        "content-length-leading-zeros": (0, [(b"POST / HTTP/1.1\r\nHost: app.example\r\nContent-Length: 0003\r\n\r\n"
                                              b"abc", respond(ok0))]),
        "many-headers": (0, [(b"GET / HTTP/1.1\r\nHost: app.example\r\n"
                              + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * i) for i in range(60)) + b"\r\n", 0)]),
        "one-byte-reads": (0, small_reads(get, 1, respond(ok0))),
    }


def http_response_seeds() -> dict:
    S = fuzz_http_response.COMMANDS

    def do(name):
        return S.index((name,))

    def client(i):
        return S.index(("client", REQUESTS[i]))

    def mode(request, ingress=0):
        return (request << 3) | ingress

    GET, HEAD, POST, CHUNKED_POST, UPGRADE, HTTP10, CLOSE, EXPECT = range(8)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
               b"5;name=value\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Checksum: 1\r\n\r\n")
    ok5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    return {
        "content-length": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: svc\r\n\r\nhello", 0)]),
        "chunked-extensions-trailers": (mode(GET), [(chunked[:40], 0), (chunked[40:90], 0), (chunked[90:], 0)]),
        "chunked-three-byte-reads": (mode(GET), small_reads(chunked, 3)),
        "head-with-length": (mode(HEAD), [(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", client(GET)),
                                          (ok5, 0)]),
        "switching-protocols": (mode(UPGRADE), [(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n\x81\x02hi", 0),
                                                (b"\x88\x00", do("client_eof")), (b"", do("service_eof"))]),
        "upgrade-refused": (mode(UPGRADE), [(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 0)]),
        "continue-then-ok": (mode(EXPECT), [(b"HTTP/1.1 100 Continue\r\n\r\n", 0), (ok5, 0)]),
        "early-hints": (mode(GET), [(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + ok5, 0)]),
        "close-delimited": (mode(GET), [(b"HTTP/1.1 200 OK\r\n\r\nuntil", 0), (b" the end", do("service_eof"))]),
        "http10-client": (mode(HTTP10), [(ok5, 0)]),
        "client-said-close": (mode(CLOSE), [(chunked, 0)]),
        "past-content-length": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello", 0)]),
        "bare-lf-head": (mode(GET), [(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n\r\n\r\n", 0)]),
        "obs-fold-head": (mode(GET), [(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n", 0)]),
        "conflicting-lengths": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 0)]),
        "length-and-chunked": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked"
                                            b"\r\n\r\n0\r\n\r\n", 0)]),
        "gzip-transfer-encoding": (mode(GET), [(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxx", 0)]),
        "bad-status-lines": (mode(GET), [(b"HTTP/2.0 200 OK\r\n\r\n", 0)]),
        "status-without-reason": (mode(GET), [(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", client(GET)),
                                              (b"HTTP/1.1 099 Low\r\n\r\n", 0)]),
        "same-head-twice": (mode(GET), [(ok5, client(GET)), (ok5, client(POST)), (ok5, 0)]),
        "reset-mid-body": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", do("service_reset"))]),
        "reset-before-response": (mode(GET), [(b"", do("service_reset"))]),
        "eof-before-response": (mode(GET), [(b"", do("service_eof"))]),
        "small-window-post": (mode(POST, 4), [(b"", do("grant")), (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                                                                   client(CHUNKED_POST)), (b"", do("grant"))]),
        "connection-named-fields": (mode(GET), [(b"HTTP/1.1 200 OK\r\nConnection: X-Custom, keep-alive\r\nX-Custom: 1"
                                                 b"\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nUpgrade: h2c\r\n"
                                                 b"Content-Length: 0\r\n\r\n", 0)]),
        "unsolicited-bytes": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0), (b"extra", 0)]),
        "paused-client-credit": (mode(GET), [(b"", do("pause_writing")), (ok5, do("resume_writing"))]),
        "no-content-with-body": (mode(GET), [(b"HTTP/1.1 204 No Content\r\n\r\noops", 0)]),
        "chunk-size-not-hex": (mode(GET), [(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 0)]),
        "gateway-timeout": (mode(GET), [(b"HTTP/1.1 200", do("expire"))]),
        "pipelined-while-answering": (mode(GET), [(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", client(HEAD)),
                                                  (b"cd", 0), (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 0)]),
    }


# --- preamble -------------------------------------------------------------------------------


def preamble_seeds() -> dict:
    READER, SMALL, SERVER, CLIENT = range(4)
    tunnel = encode_message(wire.encode_request(wire.TunnelRequest(("web", "db"))))
    csr = "-----BEGIN CERTIFICATE REQUEST-----\n" + "MIIB" * 60 + "\n-----END CERTIFICATE REQUEST-----\n"
    enroll = encode_message(wire.encode_request(wire.EnrollRequest("jt-1a2b", "s" * 43, csr)))
    ok = encode_message(wire.ok_reply(agent_id="ag-0123456789ab"))

    def raw(body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + body

    return {
        "tunnel": (READER, [(tunnel, 0)]),
        "enroll": (READER, [(enroll[:100], 0), (enroll[100:], 0)]),
        "two-messages-and-a-tail": (READER, [(tunnel + encode_message(wire.encode_request(wire.CaRequest())) + tunnel[:7], 0)]),
        "length-too-large": (READER, [(b"\xff\xff\xff\xff", 0)]),
        "empty-body": (READER, [(raw(b""), 0)]),
        "not-a-map": (READER, [(raw(msgpack.packb([1, 2, 3])), 0)]),
        "truncated-msgpack": (READER, [(raw(msgpack.packb({"op": "tunnel"})[:-2]), 0)]),
        "integer-key": (READER, [(raw(msgpack.packb({1: "x"})), 0)]),
        "deep-nesting": (READER, [(raw(b"\x81\xa1a" + b"\x91" * 3000 + b"\xc0"), 0)]),
        "ext-timestamp-bin-float": (READER, [(raw(msgpack.packb({"e": msgpack.ExtType(5, b"xy"),
                                                                  "t": msgpack.Timestamp(1, 2),
                                                                  "b": b"\x00\xff", "f": 1.5, "n": None},
                                                                 use_bin_type=True)), 0)]),
        "limit-64-exact": (SMALL, [(raw(msgpack.packb({"k": "v" * 59})), 0)]),
        "limit-64-above": (SMALL, [(raw(msgpack.packb({"k": "v" * 60})), 0)]),
        "server-tunnel": (SERVER, [(tunnel, 0)]),
        "server-one-byte-reads": (SERVER, small_reads(encode_message(wire.encode_request(wire.CaRequest())))),
        "server-client-spoke-early": (SERVER, [(tunnel + b"\x00\x00\x00\x0c", 0)]),
        "server-spoke-after-request": (SERVER, [(tunnel, 0), (b"more", 0)]),
        "server-bad-length": (SERVER, [(b"\x7f\xff\xff\xff", 0)]),
        "client-ok-then-yamux": (CLIENT, [(ok + syn(2) + data(2, b"hi"), 0), (ping(1), 0)]),
        "client-refused": (CLIENT, [(encode_message(wire.refusal_reply(wire.REVOKED, "agent ag-1: certificate revoked")), 0)]),
        "client-reply-split": (CLIENT, [(ok[:3], 0), (ok[3:9], 0), (ok[9:], 0)]),
        "client-not-a-map": (CLIENT, [(raw(msgpack.packb("ok")), 0)]),
        "client-other-version": (CLIENT, [(encode_message({"v": 2, "ok": True}) + syn(2), 0)]),
        "server-other-version": (SERVER, [(encode_message({"v": 2, "op": "tunnel", "endpoints": []}), 0)]),
        "server-unversioned": (SERVER, [(encode_message({"op": "ca"}), 0)]),
    }


# --- HTTP/1 heads -----------------------------------------------------------------------


def http1_seeds() -> dict:
    REQ, RESP, SMALL = 0, 1, 2
    get = b"GET /a/b?x=1 HTTP/1.1\r\nHost: relay.example\r\nAccept: */*\r\n\r\n"
    up = (b"GET /.relayd/agent HTTP/1.1\r\nHost: r\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(9)) + b"\r\n"
    return {
        "get": (REQ, [(get, 0)]),
        "get-one-byte-reads": (REQ, small_reads(get)),
        "upgrade": (REQ, [(up[:40], 0), (up[40:], 0)]),
        "leading-empty-lines": (REQ, [(b"\r\n\r\n" + get, 0)]),
        "pipelined": (REQ, [(get + get, 0)]),
        "obs-fold": (REQ, [(b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 0)]),
        "space-before-colon": (REQ, [(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 0)]),
        "bare-lf": (REQ, [(b"GET / HTTP/1.1\nHost: a\n\n", 0)]),
        "bare-cr-in-value": (REQ, [(b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 0)]),
        "control-in-value": (REQ, [(b"GET / HTTP/1.1\r\nA: b\x01\r\n\r\n", 0)]),
        "http09": (REQ, [(b"GET /\r\n", 0)]),
        "tls-hello": (REQ, [(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 30, 0)]),
        "too-many-fields-small": (REQ | SMALL, [(many, 0)]),
        "too-large-small": (REQ | SMALL, [(b"GET / HTTP/1.1\r\nX: " + b"a" * 1100, 0)]),
        "too-large-then-end-small": (REQ | SMALL, [(b"GET / HTTP/1.1\r\nX: " + b"a" * 1010 + b"\r\n\r\n", 0)]),
        "tabs-and-obs-text": (REQ, [(b"GET / HTTP/1.1\r\nA:\tb\tc\xff \r\n\r\n", 0)]),
        "response-ok": (RESP, [(ok, 0)]),
        "response-101": (RESP, [(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 0)]),
        "response-no-reason": (RESP, [(b"HTTP/1.0 200\r\n\r\n", 0)]),
        "response-proxy": (RESP, [(b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy\r\n\r\n", 0)]),
        "response-bad-status": (RESP, [(b"HTTP/1.1 99 Low\r\n\r\n", 0)]),
        "response-http2": (RESP, [(b"HTTP/2 200\r\n\r\n", 0)]),
        "response-fold": (RESP, [(b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n", 0)]),
        "response-control-reason": (RESP, [(b"HTTP/1.1 200 O\x01K\r\n\r\n", 0)]),
        "response-many-small": (RESP | SMALL, [(b"HTTP/1.1 200 OK\r\n" + many.split(b"\r\n", 1)[1], 0)]),
    }


def hcwire_seeds() -> dict:
    TARGET, MESSAGE, TOKEN = 0, 1, 2
    from relayd.control import sas

    good = sas.make_token("http://relay.example/orders", "root", "a-key-for-the-fuzzer-0123", 1_700_000_600)
    return {
        "listen": (TARGET, [(b"orders?sb-hc-action=listen&sb-hc-id=abc", 0)]),
        "connect-suffix-query": (TARGET, [(b"orders/a/b?x=1&y=%20z&sb-hc-action=connect&sb-hc-token=T%20x", 0)]),
        "accept": (TARGET, [(b"orders?sb-hc-action=accept&sb-hc-id=1&sb-hc-rendezvous=k", 0)]),
        "reject": (TARGET, [(b"o?sb-hc-action=accept&sb-hc-statusCode=418&sb-hc-statusDescription=No%20way", 0)]),
        "undefined-kept": (TARGET, [(b"o?sb-hc-undefined&SB-HC-ACTION=listen", 0)]),
        "encoded-path": (TARGET, [(b"a%2Fb/%2e%2e/c?", 0)]),
        "empty": (TARGET, [(b"", 0)]),
        "renew": (MESSAGE, [(b'{"renewToken": {"token": "SharedAccessSignature sr=a&sig=b&se=1&skn=c"}}', 0)]),
        "response": (MESSAGE, [(b'{"response": {"requestId": "r1", "statusCode": 201, "statusDescription": '
                                b'"Created", "responseHeaders": {"a": "b"}, "body": true}}', 0)]),
        "response-string-status": (MESSAGE, [(b'{"response": {"requestId": "r", "statusCode": "200"}}', 0)]),
        "response-bad-headers": (MESSAGE, [(b'{"response": {"requestId": "r", "statusCode": 200, '
                                            b'"responseHeaders": {"a": 1}}}', 0)]),
        "unknown": (MESSAGE, [(b'{"future": {}}', 0)]),
        "two-keys": (MESSAGE, [(b'{"a": {}, "b": {}}', 0)]),
        "not-json": (MESSAGE, [(b"{nope", 0)]),
        "array": (MESSAGE, [(b"[1, 2]", 0)]),
        "token-good": (TOKEN, [(good.encode(), 0)]),
        "token-bad-sig": (TOKEN, [(good.replace("sig=", "sig=x").encode(), 0)]),
        "token-other-resource": (TOKEN, [(sas.make_token("http://relay.example/other", "root",
                                                          "a-key-for-the-fuzzer-0123", 1_700_000_600).encode(), 0)]),
        "token-expired": (TOKEN, [(sas.make_token("http://relay.example/orders", "root", "a-key-for-the-fuzzer-0123",
                                                   1_600_000_000).encode(), 0)]),
        "token-malformed": (TOKEN, [(b"SharedAccessSignature sr=&&&", 0)]),
        "token-no-scheme": (TOKEN, [(b"Bearer x", 0)]),
    }


def jws_seeds() -> dict:
    RAW, AFTER_GOOD = 0, 1
    import base64
    import json

    from fuzz.fuzz_jws import GOOD, KEY
    from relayd.control import jws

    h, p, sig = GOOD.split(".")

    def b64(obj) -> str:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def forged(header=None, payload=None, **hdr) -> bytes:
        head = b64(header or {"alg": "EdDSA", "typ": jws.CLAIMS, "kid": jws.key_id(KEY.public_key()), **hdr})
        body = b64(payload if payload is not None else {"sub": "CN=a", "iat": 1, "nbf": 0, "exp": 2})
        return f"{head}.{body}.{b64(KEY.sign(f'{head}.{body}'.encode()))}".encode()

    deep: object = 1
    for _ in range(10):
        deep = [deep]
    return {
        "extra-header-key": (RAW, [(forged(jku="http://x"), 0)]),
        "wrong-typ": (RAW, [(forged(typ=jws.ENTITLEMENTS), 0)]),
        "unknown-kid": (RAW, [(forged(kid="AAAAAAAAAAAAAAAA"), 0)]),
        "duplicate-keys": (RAW, [(forged(payload=b'{"a": 1, "a": 2}'), 0)]),
        "too-deep": (RAW, [(forged(payload={"d": deep}), 0)]),
        "float-time": (RAW, [(forged(payload={"exp": 2.5}), 0)]),
        "bool-time": (RAW, [(forged(payload={"iat": True}), 0)]),
        "nan": (RAW, [(forged(payload=b'{"a": NaN}'), 0)]),
        "array-payload": (RAW, [(forged(payload=[1, 2]), 0)]),
        "changed-payload": (RAW, [(f"{h}.{b64({'sub': 'CN=b'})}.{sig}".encode(), 0)]),
        "good": (RAW, [(GOOD.encode(), 0)]),
        "good-then-junk": (AFTER_GOOD, [(b".x", 0)]),
        "good-then-nothing": (AFTER_GOOD, [(b"", 0)]),
        "padding": (RAW, [(f"{h}.{p}.{sig}==".encode(), 0)]),
        "two-parts": (RAW, [(f"{h}.{p}".encode(), 0)]),
        "alg-none": (RAW, [(b"eyJhbGciOiJub25lIiwidHlwIjoicmVsYXlkLWNsYWltcytqd3QiLCJraWQiOiJ4In0." + p.encode()
                            + b".", 0)]),
        "plus-slash": (RAW, [(f"{h}.{p}+/.{sig}".encode(), 0)]),
        "empty": (RAW, [(b"", 0)]),
        "dots": (RAW, [(b"..", 0)]),
        "garbage": (RAW, [(b"\xff\x00not a token", 0)]),
    }


def est_seeds() -> dict:
    import base64

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    from fuzz.fuzz_est import GOOD, KEY, good_csr

    AUTH, CTYPE = 1, 2
    PLAIN, NO_TYPE, AFTER_GOOD = 0, 1, 4
    der = base64.b64decode(GOOD)

    def csr_with(key, algorithm=None) -> bytes:
        ec_key = isinstance(key, ec.EllipticCurvePrivateKey)
        csr = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])).sign(
            key, algorithm, **({"ecdsa_deterministic": True} if ec_key else {}))
        return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))

    bad_sig = bytearray(der)
    bad_sig[-3] ^= 0x55
    wrapped = b"\n".join(GOOD[i:i + 64] for i in range(0, len(GOOD), 64)) + b"\n"
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + wrapped + b"-----END CERTIFICATE REQUEST-----\n")
    basic = b"Basic " + base64.b64encode(b"cam:0123456789ABCDEFGHJKMNPQRS")
    return {
        "good": (PLAIN, [(GOOD, 0)]),
        "good-wrapped-64": (PLAIN, [(wrapped, 0)]),
        "good-pem": (PLAIN, [(pem, 0)]),
        "good-basic": (PLAIN, [(basic, AUTH), (GOOD, 0)]),
        "good-bearer": (PLAIN, [(b"Bearer 0123456789ABCDEFGHJKMNPQRS", AUTH), (GOOD, 0)]),
        "basic-no-colon": (PLAIN, [(b"Basic " + base64.b64encode(b"justuser"), AUTH), (GOOD, 0)]),
        "basic-not-base64": (PLAIN, [(b"Basic %%%", AUTH), (GOOD, 0)]),
        "basic-not-utf8": (PLAIN, [(b"Basic " + base64.b64encode(b"a:\xff\xfe"), AUTH), (GOOD, 0)]),
        "bearer-not-ascii": (PLAIN, [(b"Bearer \xc3\xa9t\xc3\xa9", AUTH), (GOOD, 0)]),
        "digest": (PLAIN, [(b'Digest username="a"', AUTH), (GOOD, 0)]),
        "type-with-params": (PLAIN, [(b"Application/PKCS10; charset=x", CTYPE), (GOOD, 0)]),
        "type-json": (PLAIN, [(b"application/json", CTYPE), (GOOD, 0)]),
        "no-type": (NO_TYPE, [(GOOD, 0)]),
        "bad-signature": (PLAIN, [(base64.b64encode(bytes(bad_sig)), 0)]),
        "truncated": (PLAIN, [(base64.b64encode(der[:len(der) // 2]), 0)]),
        "garbage": (PLAIN, [(b"\x00\xff garbage \x01", 0)]),
        "not-a-csr": (PLAIN, [(base64.b64encode(b"\x30\x03\x02\x01\x00"), 0)]),
        "empty": (PLAIN, [(b"", 0)]),
        "whitespace": (PLAIN, [(b" \r\n\t ", 0)]),
        "ed25519": (PLAIN, [(csr_with(ed25519.Ed25519PrivateKey.from_private_bytes(bytes(32))), 0)]),
        "p521-refused": (PLAIN, [(csr_with(ec.derive_private_key(7, ec.SECP521R1()), hashes.SHA256()), 0)]),
        "p384": (PLAIN, [(csr_with(ec.derive_private_key(7, ec.SECP384R1()), hashes.SHA384()), 0)]),
        "no-password": (PLAIN, [(csr_with(KEY, hashes.SHA256()), 0)]),
        "empty-password": (PLAIN, [(good_csr(""), 0)]),
        "after-good-junk": (AFTER_GOOD, [(b"====", 0)]),
        "pem-broken": (PLAIN, [(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", 0)]),
    }


# --- zero-trust ---------------------------------------------------------------------------


def ztsession_seeds() -> dict:
    HELLO_DONE, FLOW, JSON = 1, 2, 4
    iid = "0123456789abcdef0123456789abcdef"
    tok = "eyJhbGciOiJFZERTQSIsInR5cCI6InJlbGF5ZC1jbGFpbXMrand0Iiwia2lkIjoiQUFBQSJ9.e30.c2ln"
    hello = {"type": "hello", "claims": tok, "entitlements": tok, "client": "relayd",
             "device": {"os": {"family": "linux", "version": "6.8"}, "av": {"enabled": True}},
             "reasons": [{"suffix": "why", "text": "ticket OPS-42", "at": 1732350000}]}

    def mp(doc) -> bytes:
        return msgpack.packb(doc, use_bin_type=True)

    def js(doc) -> bytes:
        return json.dumps(doc).encode()

    deep: object = 1
    for _ in range(8):
        deep = {"d": deep}
    return {
        "hello": (0, [(mp(hello), 0)]),
        "hello-json": (JSON, [(js(hello), 0)]),
        "hello-no-claims": (0, [(mp({"type": "hello", "entitlements": tok}), 0)]),
        "hello-claims-a-number": (0, [(mp(dict(hello, claims=5)), 0)]),
        "hello-device-a-list": (0, [(mp(dict(hello, device=["x"])), 0)]),
        "hello-device-bytes": (0, [(mp(dict(hello, device={"serial": b"\x00\xff"})), 0)]),
        "hello-device-ext": (0, [(mp(dict(hello, device={"t": msgpack.ExtType(5, b"x")})), 0)]),
        "hello-device-deep": (0, [(mp(dict(hello, device=deep)), 0)]),
        "hello-33-reasons": (0, [(mp(dict(hello, reasons=hello["reasons"] * 33)), 0)]),
        "hello-reason-newline": (0, [(mp(dict(hello, reasons=[{"suffix": "why", "text": "a\nb", "at": 1}])), 0)]),
        "hello-reason-at-bool": (JSON, [(js(dict(hello, reasons=[{"suffix": "why", "text": "a", "at": True}])), 0)]),
        "ping-before-hello": (0, [(mp({"type": "ping"}), 0)]),
        "second-hello": (HELLO_DONE, [(mp(hello), 0)]),
        "tokens-with-certificate": (HELLO_DONE, [(mp({"type": "tokens", "claims": tok, "entitlements": tok,
                                                      "certificate": "-----BEGIN CERTIFICATE-----\nMIIB\n"}), 0)]),
        "tokens-none": (HELLO_DONE, [(mp({"type": "tokens"}), 0)]),
        "claims": (HELLO_DONE | JSON, [(js({"type": "claims", "claims": tok}), 0)]),
        "claims-a-list": (HELLO_DONE, [(mp({"type": "claims", "claims": [tok]}), 0)]),
        "entitlements": (HELLO_DONE, [(mp({"type": "entitlements", "entitlements": tok}), 0)]),
        "device": (HELLO_DONE | JSON, [(js({"type": "device", "claims": {"av": {"enabled": True}}}), 0)]),
        "device-bytes-key": (HELLO_DONE, [(mp({"type": "device", "claims": {b"k": 1}}), 0)]),
        "reason": (HELLO_DONE | JSON, [(js({"type": "reason", "interaction": iid, "suffix": "why",
                                            "text": "restore the backup"}), 0)]),
        "reason-control": (HELLO_DONE, [(mp({"type": "reason", "interaction": iid, "suffix": "why",
                                             "text": "\x1b[2J\u2028x"}), 0)]),
        "reason-long": (HELLO_DONE, [(mp({"type": "reason", "interaction": iid, "suffix": "why",
                                          "text": "x" * 513}), 0)]),
        "reason-no-interaction": (HELLO_DONE, [(mp({"type": "reason", "suffix": "why", "text": "x"}), 0)]),
        "reason-bad-suffix": (HELLO_DONE, [(mp({"type": "reason", "interaction": iid, "suffix": "a b",
                                                "text": "x"}), 0)]),
        "ping": (HELLO_DONE, [(mp({"type": "ping"}), 0)]),
        "unknown-type": (HELLO_DONE, [(mp({"type": "renew"}), 0)]),
        "type-a-list": (HELLO_DONE | JSON, [(b'{"type": ["ping"]}', 0)]),
        "not-a-map": (HELLO_DONE, [(mp(["ping"]), 0)]),
        "not-msgpack": (0, [(b"\xc1\x00", 0)]),
        "flow": (FLOW, [(mp({"proto": "tcp", "host": "10.20.5.9", "port": 5432}), 0)]),
        "flow-name": (FLOW | JSON, [(js({"proto": "tcp", "host": "DB.Lab.Internal.", "port": 5432}), 0)]),
        "flow-address-dot": (FLOW | JSON, [(js({"proto": "tcp", "host": "10.0.0.1.", "port": 1}), 0)]),
        "flow-mapped": (FLOW, [(mp({"proto": "tcp", "host": "::ffff:127.0.0.1", "port": 65535}), 0)]),
        "flow-zone": (FLOW, [(mp({"proto": "tcp", "host": "fe80::1%eth0", "port": 22}), 0)]),
        "flow-port-0": (FLOW | JSON, [(js({"proto": "tcp", "host": "10.0.0.1", "port": 0}), 0)]),
        "flow-port-bool": (FLOW | JSON, [(b'{"proto": "tcp", "host": "10.0.0.1", "port": true}', 0)]),
        "flow-udp": (FLOW, [(mp({"proto": "udp", "host": "10.0.0.1", "port": 53}), 0)]),
        "flow-host-nul": (FLOW, [(mp({"proto": "tcp", "host": "db\x00.lab", "port": 80}), 0)]),
        "flow-ip-mode": (FLOW, [(mp({"proto": "ip"}), 0)]),
    }


#: The policy of the spec's section 5, as JSON (the admin API's form).
POLICY = {
    "sites": [{"id": "s-lab", "networks": ["10.20.0.0/16"]}],
    "conditions": [{"id": "c-office-or-otp", "logic": "any",
                    "criteria": [{"claim": "system.client_src_ip", "op": "cidr", "value": ["198.51.100.0/24"]},
                                 {"stepup": "otp", "suffix": "lab", "provider": "totp", "max_age": "60m"}],
                    "recheck": ["15m", "08:00"], "remedy_logic": "any",
                    "remedies": [{"type": "otp", "provider": "totp", "suffix": "lab",
                                  "message": "Enter your authenticator code."},
                                 {"type": "message", "kind": "info", "message": "Or connect from the office."}]}],
    "entitlements": [{"id": "e-lab-db", "site": "s-lab", "condition_logic": "all",
                      "conditions": ["c-office-or-otp"], "tags": ["lab"],
                      "actions": [{"action": "allow", "proto": "tcp", "hosts": ["10.20.5.0/24", "db.lab.internal"],
                                   "ports": ["5432", "8000-8100"]},
                                  {"action": "block", "proto": "tcp", "hosts": ["10.20.5.9"], "ports": ["5432"]}]}],
    "policies": [{"id": "p-dba", "match": {"logic": "all", "criteria": [{"claim": "user.groups", "op": "contains",
                                                                         "value": "dba"}]},
                  "entitlements": ["e-lab-db"], "entitlement_tags": ["lab"], "stop": False}],
}


def policy_seeds() -> dict:
    SITES, CONDITIONS, ENTITLEMENTS, POLICIES = range(4)
    WHOLE, TOML = 4, 8
    from relayd.control.policy import to_toml

    def js(doc) -> bytes:
        return json.dumps(doc, ensure_ascii=False).encode()

    cond = POLICY["conditions"][0]
    ent = POLICY["entitlements"][0]
    nested: dict = {"claim": "device.os.family", "op": "eq", "value": "linux"}
    for i in range(10):
        nested = {"not": nested} if i % 2 else {"logic": "any", "criteria": [nested]}
    return {
        "whole": (WHOLE, [(js(POLICY), 0)]),
        "whole-toml": (WHOLE | TOML, [(to_toml(POLICY).encode(), 0)]),
        "whole-toml-inline": (WHOLE | TOML, [(b'[[sites]]\nid = "s"\n\n[[entitlements]]\nid = "e"\nsite = "s"\n'
                                              b'actions = [{ action = "allow", proto = "icmp", hosts = ["10.0.0.0/8"],'
                                              b' types = ["8", "0"] }]\n', 0)]),
        "whole-unknown-condition": (WHOLE, [(js(dict(POLICY, conditions=[])), 0)]),
        "whole-twice": (WHOLE, [(js(dict(POLICY, sites=POLICY["sites"] * 2)), 0)]),
        "whole-emoji-and-controls": (WHOLE, [(js(dict(POLICY, conditions=[dict(cond, remedies=[
            {"type": "message", "kind": "info", "message": "Office only \U0001f3e2 \x7f\x1b[0m \"quoted\" \\"}])])), 0)]),
        "whole-not-a-table": (WHOLE, [(b"[1, 2]", 0)]),
        "whole-not-json": (WHOLE, [(b"{sites: []", 0)]),
        "site": (SITES, [(js(POLICY["sites"][0]), 0)]),
        "site-bad-network": (SITES, [(js({"id": "s", "networks": ["10.0.0.0/33"]}), 0)]),
        "site-toml": (SITES | TOML, [(b'id = "s-lab"\nnetworks = ["10.20.0.0/16", "fd00::/8"]\ngateways = ["gw:443"]\n', 0)]),
        "condition": (CONDITIONS, [(js(cond), 0)]),
        "condition-time-window": (CONDITIONS, [(js({"id": "c-night", "criteria": [{"time_window": {
            "days": ["fri", "sat"], "from": "22:00", "to": "06:00", "tz": "Europe/Paris"}}]}), 0)]),
        "condition-reason": (CONDITIONS, [(js({"id": "c-why", "criteria": [{"reason": True, "suffix": "why",
                                                                           "max_age": 600, "min_len": 5}],
                                               "remedies": [{"type": "reason", "suffix": "why"}]}), 0)]),
        "condition-remedy-untested": (CONDITIONS, [(js(dict(cond, remedies=[{"type": "otp", "suffix": "other"}])), 0)]),
        "condition-nested": (CONDITIONS, [(js({"id": "c-deep", "criteria": [nested]}), 0)]),
        "condition-ops": (CONDITIONS, [(js({"id": "c-ops", "logic": "all", "criteria": [
            {"claim": "device.os.version", "op": "version_ge", "value": "6.1"},
            {"claim": "device.hostname", "op": "glob", "value": "*-LT"},
            {"claim": "device.disk.free", "op": "gt", "value": 1.5},
            {"claim": "user.groups", "op": "has_any", "value": ["a", 1, True]},
            {"claim": "device.av.enabled", "op": "exists"}]}), 0)]),
        "condition-huge-max-age-toml": (CONDITIONS | TOML, [(b'id = "c"\ncriteria = [{ stepup = "otp", suffix = "x",'
                                                             b' max_age = ' + b"9" * 400 + b' }]\n', 0)]),
        "condition-max-age-beyond-json": (CONDITIONS, [(js({"id": "c", "criteria": [
            {"stepup": "otp", "suffix": "x", "max_age": "6" + "8" * 40 + "m"}]}), 0)]),
        "condition-value-2-64-toml": (CONDITIONS | TOML, [(b'id = "c"\ncriteria = [{ claim = "device.n", op = "lt",'
                                                           b' value = 18446744073709551616 }]\n', 0)]),
        "condition-min-len-huge": (CONDITIONS, [(js({"id": "c", "criteria": [{"reason": True, "suffix": "why",
                                                                             "max_age": "1h", "min_len": 2 ** 40}]}), 0)]),
        "condition-tz-dir": (CONDITIONS, [(js({"id": "c", "criteria": [{"time_window": {
            "from": "08:00", "to": "18:00", "tz": "America"}}]}), 0)]),
        "entitlement": (ENTITLEMENTS, [(js(ent), 0)]),
        "entitlement-icmp-types-a-number": (ENTITLEMENTS, [(js({"id": "e", "site": "s", "actions": [
            {"action": "allow", "proto": "icmp", "hosts": ["10.0.0.0/8"], "types": 8}]}), 0)]),
        "entitlement-ports-edges": (ENTITLEMENTS | TOML, [(b'id = "e"\nsite = "s"\nactions = [{ action = "alert",'
                                                           b' proto = "udp", hosts = ["::/0", "a.b"], ports = [0, '
                                                           b'"1-65535", 65535] }]\n', 0)]),
        "entitlement-port-65536": (ENTITLEMENTS, [(js(dict(ent, actions=[dict(ent["actions"][0], ports=["65536"])])), 0)]),
        "policy": (POLICIES, [(js(POLICY["policies"][0]), 0)]),
        "policy-stop": (POLICIES | TOML, [(b'id = "p-stop"\nstop = true\nmatch = { criteria = [{ claim = "user.email",'
                                           b' op = "glob", value = "*@old.example" }] }\n', 0)]),
        "policy-device-claim": (POLICIES, [(js({"id": "p", "match": {"criteria": [
            {"claim": "device.os.family", "op": "eq", "value": "linux"}]}}), 0)]),
    }


def ippacket_seeds() -> dict:
    import ipaddress

    from relayd.core.framing import frame_packet

    def v4(proto, src, dst, l4, frag=0, ihl=5, total=None):
        n = 4 * ihl + len(l4) if total is None else total
        return (bytes([0x40 | ihl, 0]) + n.to_bytes(2, "big") + b"\0\0" + frag.to_bytes(2, "big") + bytes([64, proto])
                + b"\0\0" + ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
                + b"\x01" * (4 * (ihl - 5)) + l4)

    def v6(nh, src, dst, l4):
        return (b"\x60\0\0\0" + len(l4).to_bytes(2, "big") + bytes([nh, 64]) + ipaddress.IPv6Address(src).packed
                + ipaddress.IPv6Address(dst).packed + l4)

    def ports(s, d):
        return s.to_bytes(2, "big") + d.to_bytes(2, "big") + b"\0" * 16

    def echo(t, ident):
        return bytes([t, 0, 0, 0]) + ident.to_bytes(2, "big") + b"\0\1" + b"ping"

    C, S = "100.96.0.2", "10.78.0.1"
    syn, back = v4(6, C, S, ports(40000, 443)), v4(6, S, C, ports(443, 40000))
    req, rep = v4(1, C, S, echo(8, 7)), v4(1, S, C, echo(0, 7))

    def frames(*pkts):
        return b"".join(frame_packet(p) for p in pkts)

    return {
        "tcp-and-reply": (0, [(frames(syn, back), 0)]),
        "tcp-split-reads": (0, [(frames(syn)[:3], 0), (frames(syn)[3:] + frames(back), 0)]),
        "udp-dns": (0, [(frames(v4(17, C, S, ports(5353, 53)), v4(17, S, C, ports(53, 5353))), 0)]),
        "udp-wrong-port": (0, [(frames(v4(17, C, S, ports(5353, 54))), 0)]),
        "echo-and-reply": (0, [(frames(req, rep), 0)]),
        "echo-reply-other-id": (0, [(frames(req, v4(1, S, C, echo(0, 8))), 0)]),
        "icmp-error-quoting": (0, [(frames(syn, v4(1, S, C, bytes([3, 4, 0, 0, 0, 0, 5, 0x78]) + syn[:28])), 0)]),
        "icmp-error-quoting-other": (0, [(frames(v4(1, S, C, bytes([11, 0, 0, 0, 0, 0, 0, 0]) + syn[:28])), 0)]),
        "blocked-port": (0, [(frames(v4(6, C, "10.78.0.9", ports(1, 22))), 0)]),
        "ipv4-options": (0, [(frames(v4(6, C, S, ports(1, 80), ihl=15)), 0)]),
        "first-fragment": (0, [(frames(v4(6, C, S, ports(1, 80), frag=0x2000)), 0)]),
        "later-fragment": (0, [(frames(v4(6, C, S, b"\0" * 8, frag=0x0010)), 0)]),
        "total-beyond": (0, [(frames(v4(6, C, S, ports(1, 80), total=900)), 0)]),
        "header-short": (0, [(frames(v4(6, C, S, ports(1, 80), ihl=4)), 0)]),
        "no-ports": (0, [(frames(v4(6, C, S, b"\0\1")), 0)]),
        "gre": (0, [(frames(v4(47, C, S, b"\0" * 16)), 0)]),
        "ipv6-tcp": (0, [(frames(v6(6, "fd00::2", "fd00:1::1", ports(1, 22))), 0)]),
        "ipv6-echo": (0, [(frames(v6(58, "fd00::2", "fd00:1::1", echo(128, 3))), 0)]),
        "ipv6-error": (0, [(frames(v6(58, "fd00:1::1", "fd00::2", bytes([1, 4, 0, 0, 0, 0, 0, 0])
                                     + v6(6, "fd00::2", "fd00:1::1", ports(1, 22))[:48])), 0)]),
        "version-5": (0, [(frames(b"\x55" + bytes(39)), 0)]),
        "zero-length-frame": (0, [(frames(syn) + b"\0\0" + frames(back), 0)]),
        "frame-announces-more": (0, [(b"\xff\xff" + syn, 0)]),
        "spoofed-source": (0, [(frames(v4(6, "100.96.0.3", S, ports(1, 80))), 0)]),
        "many-flows": (0, [(frames(*(v4(6, C, S, ports(1000 + i, 80)) for i in range(80))), 0)]),
    }


def usertoken_seeds() -> dict:
    HEADER, CODES, BEARER, AFTER_GOOD = 0, 1, 2, 4
    import base64
    import json

    from fuzz.fuzz_usertoken import AUTH, GOOD, KEY, NOW
    from relayd.control import jws
    from relayd.control.devices import USER_AUDIENCE, USER_TOKEN

    def b64(obj) -> str:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def signed(typ=USER_TOKEN, **claims) -> bytes:
        body = {"iss": AUTH.issuer, "aud": USER_AUDIENCE, "sub": "bob", "iat": NOW, "nbf": NOW, "exp": NOW + 60,
                **claims}
        return jws.sign(body, typ, KEY).encode()

    h, p, sig = GOOD.split(".")
    return {
        "good": (BEARER, [(GOOD.encode(), 0)]),
        "good-bare": (HEADER, [(GOOD.encode(), 0)]),
        "good-then-junk": (AFTER_GOOD | BEARER, [(b"x", 0)]),
        "lower-case-bearer": (HEADER, [(b"bearer " + GOOD.encode(), 0)]),
        "basic": (HEADER, [(b"Basic YWxpY2U6cHc=", 0)]),
        "empty": (HEADER, [(b"", 0)]),
        "spaces": (BEARER, [(b"   ", 0)]),
        "expired": (BEARER, [(signed(exp=NOW - 1), 0)]),
        "not-yet": (BEARER, [(signed(nbf=NOW + 3600), 0)]),
        "other-audience": (BEARER, [(signed(aud="relayd-device-proxy"), 0)]),
        "proxy-typ": (BEARER, [(signed(typ=jws.PROXY), 0)]),
        "no-subject": (BEARER, [(signed(sub=""), 0)]),
        "foreign-issuer": (BEARER, [(f"{h}.{b64({'iss': 'https://idp.example.test', 'sub': 'x'})}.{sig}".encode(), 0)]),
        "changed-subject": (BEARER, [(f"{h}.{b64({**json.loads(base64.urlsafe_b64decode(p + '==')), 'sub': 'eve'})}"
                                      f".{sig}".encode(), 0)]),
        "non-ascii": (BEARER, [("é.é.é".encode(), 0)]),
        "claim-code": (CODES, [(b"7k3m-q9xa-lo1i-zzzz", 0)]),
        "claim-code-spaced": (CODES, [(b" 7K3M Q9XA 0011 ZZZZ ", 0)]),
        "claim-code-u": (CODES, [(b"7K3M-Q9XA-UUUU-ZZZZ", 0)]),
        "otp": (CODES, [(b"5NKY-0000-1111-2222-3333-4444-AB", 0)]),
        "code-too-long": (CODES, [(b"-" * 70, 0)]),
        "issuer-peek": (CODES, [(f"x.{b64({'iss': 'a' * 600})}.y".encode(), 0)]),
    }


# --- ACME and the HTTPS listener's ClientHello peek ------------------------------------------


def acme_seeds() -> dict:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    PROBLEM, DIRECTORY, ORDER, AUTHZ, RETRY, CHAIN, ERROR, IN_DIRECTORY = range(8)
    JSON = 8
    ns = "urn:ietf:params:acme:error:"
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"

    def js(doc) -> bytes:
        return json.dumps(doc).encode()

    def cert(name: str, seed: int) -> bytes:
        # Ed25519 signatures are deterministic: the seed bytes stay the same.
        key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        when = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(seed).not_valid_before(when).not_valid_after(when + datetime.timedelta(days=90))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(key, None).public_bytes(Encoding.PEM))

    order = {"status": "pending", "expires": "2030-01-08T00:00:00Z",
             "identifiers": [{"type": "dns", "value": "app.example"}],
             "authorizations": ["https://ca.test/acme/authz/1"], "finalize": "https://ca.test/acme/order/1/finalize"}
    authz = {"status": "pending", "identifier": {"type": "dns", "value": "app.example"},
             "challenges": [{"type": "http-01", "url": "https://ca.test/chall/1", "status": "pending", "token": token},
                            {"type": "tls-alpn-01", "url": "https://ca.test/chall/2", "status": "pending",
                             "token": token},
                            {"type": "dns-01", "url": "https://ca.test/chall/3", "status": "pending", "token": token}]}
    nested: object = {"type": ns + "malformed"}
    for _ in range(30):
        nested = {"type": ns + "compound", "subproblems": [nested]}
    return {
        "problem-rejected": (PROBLEM | JSON, [(js({
            "type": ns + "rejectedIdentifier", "status": 400, "detail": "Error creating new order",
            "subproblems": [{"type": ns + "caa", "detail": "CAA record forbids issuance",
                             "identifier": {"type": "dns", "value": "b.example"}}]}), 0)]),
        "problem-bad-nonce": (PROBLEM | JSON, [(js({"type": ns + "badNonce", "detail": "JWS has an invalid "
                                                    "anti-replay nonce"}), 0)]),
        "problem-rate-limited": (PROBLEM | JSON | 0x90, [(js({"type": ns + "rateLimited", "detail": "too many"}), 0)]),
        "problem-html": (PROBLEM, [(b"<html><body>502 Bad Gateway</body></html>", 0)]),
        "problem-not-object": (PROBLEM | JSON, [(b"[1, 2, 3]", 0)]),
        "problem-control": (PROBLEM | JSON, [(js({"type": ns + "malformed", "detail": "a\x1b[2J\u2028b\nc" * 20}), 0)]),
        "problem-deep": (PROBLEM | JSON, [(js(nested), 0)]),
        "problem-typeless": (PROBLEM | JSON, [(b'{"detail": 5, "subproblems": "x"}', 0)]),
        "directory": (DIRECTORY, [(js({"newNonce": "https://ca.test/acme/new-nonce",
                                       "newAccount": "https://ca.test/acme/new-acct",
                                       "newOrder": "https://ca.test/acme/new-order",
                                       "revokeCert": "https://ca.test/acme/revoke-cert",
                                       "keyChange": "https://ca.test/acme/key-change",
                                       "meta": {"termsOfService": "https://ca.test/terms.pdf",
                                                "caaIdentities": ["ca.test"]}}), 0)]),
        "directory-http": (DIRECTORY, [(js({"newNonce": "http://ca.test/n", "newAccount": "https://ca.test/a",
                                            "newOrder": "https://ca.test/o"}), 0)]),
        "directory-missing": (DIRECTORY, [(js({"newNonce": "https://ca.test/n"}), 0)]),
        "directory-override": (IN_DIRECTORY, [(b', "newOrder": "https://ca.test/other order"', 0)]),
        "directory-add": (IN_DIRECTORY, [(b', "meta": []', 0)]),
        "order-pending": (ORDER, [(js(order), 0)]),
        "order-valid": (ORDER, [(js(dict(order, status="valid", certificate="https://ca.test/cert/1")), 0)]),
        "order-valid-no-cert": (ORDER, [(js(dict(order, status="valid")), 0)]),
        "order-invalid": (ORDER, [(js(dict(order, status="invalid", error={"type": ns + "unauthorized",
                                                                           "detail": "no"})), 0)]),
        "order-no-authz": (ORDER, [(js(dict(order, authorizations=[])), 0)]),
        "authz": (AUTHZ, [(js(authz), 0)]),
        "authz-failed": (AUTHZ, [(js(dict(authz, status="invalid", challenges=[dict(
            authz["challenges"][0], status="invalid", error={"type": ns + "connection", "detail": "refused"})])), 0)]),
        "authz-ip": (AUTHZ, [(js(dict(authz, identifier={"type": "ip", "value": "192.0.2.1"})), 0)]),
        "authz-wildcard": (AUTHZ, [(js(dict(authz, wildcard=True, identifier={"type": "dns",
                                                                               "value": "*.app.example"})), 0)]),
        "authz-bad-token": (AUTHZ, [(js(dict(authz, challenges=[dict(authz["challenges"][0], token="../x")])), 0)]),
        "authz-upper": (AUTHZ, [(js(dict(authz, identifier={"type": "dns", "value": "APP.Example"})), 0)]),
        "retry-seconds": (RETRY, [(b"120", 0)]),
        "retry-date": (RETRY, [(b"Wed, 21 Oct 2015 07:28:00 GMT", 0)]),
        "retry-negative": (RETRY, [(b"-1", 0)]),
        "retry-huge": (RETRY, [(b"9" * 40, 0)]),
        "retry-arabic-digits": (RETRY, [("١٢".encode(), 0)]),
        "chain": (CHAIN, [(cert("app.example", 1) + cert("Intermediate", 2), 0)]),
        "chain-crlf": (CHAIN, [(cert("app.example", 1).replace(b"\n", b"\r\n"), 0)]),
        "chain-with-key": (CHAIN, [(cert("app.example", 1) + b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                    b"-----END PRIVATE KEY-----\n", 0)]),
        "chain-truncated": (CHAIN, [(cert("app.example", 1)[:300], 0)]),
        "error": (ERROR, [(js({"type": ns + "dns", "detail": "NXDOMAIN looking up A for app.example"}), 0)]),
        "error-string": (ERROR, [(b'"just text"', 0)]),
    }


def tlshello_seeds() -> dict:
    from fuzz.fuzz_tlshello import GOOD, client_hello

    RAW, AFTER_GOOD = 0, 1
    return {
        "good": (RAW, [(GOOD, 0)]),
        "good-one-byte-reads": (RAW, small_reads(GOOD[:40]) + [(GOOD[40:], 0)]),
        "good-then-more": (AFTER_GOOD, [(b"\x17\x03\x03\x00\x05hello", 0)]),
        "good-cut": (RAW, [(GOOD[: len(GOOD) // 2], 0)]),
        "no-sni": (RAW, [(client_hello(None), 0)]),
        "no-alpn": (RAW, [(client_hello(alpn=()), 0)]),
        "upper-case-name": (RAW, [(client_hello(b"App.EXAMPLE"), 0)]),
        "name-with-space": (RAW, [(client_hello(b"app example"), 0)]),
        "name-empty": (RAW, [(client_hello(b""), 0)]),
        "alpn-empty-name": (RAW, [(client_hello(alpn=(b"h2", b"")), 0)]),
        "second-sni": (RAW, [(client_hello(extensions=b"\x00\x00\x00\x08\x00\x06\x00\x00\x03a.b"), 0)]),
        "second-alpn": (RAW, [(client_hello(extensions=b"\x00\x10\x00\x05\x00\x03\x02h2"), 0)]),
        "ext-overrun": (RAW, [(client_hello(extensions=b"\x00\x2a\x00\x09\x00"), 0)]),
        "grease": (RAW, [(client_hello(extensions=b"\x0a\x0a\x00\x00\xfa\xfa\x00\x01\x00"), 0)]),
        "session-id-33": (RAW, [(client_hello(session_id=b"\x01" * 33), 0)]),
        "record-too-long": (RAW, [(b"\x16\x03\x01\x40\x01" + GOOD[5:], 0)]),
        "record-empty": (RAW, [(b"\x16\x03\x01\x00\x00", 0)]),
        "spans-records": (RAW, [(GOOD[:3] + (len(GOOD) - 15).to_bytes(2, "big") + GOOD[5:-10], 0)]),
        "not-client-hello": (RAW, [(GOOD[:5] + b"\x02" + GOOD[6:], 0)]),
        "application-data": (RAW, [(b"\x17\x03\x03\x00\x10" + b"\x00" * 16, 0)]),
        "sslv2": (RAW, [(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", 0)]),
        "http": (RAW, [(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0)]),
    }


HARNESSES = {
    "yamux": yamux_seeds,
    "wsframe": wsframe_seeds,
    "wsconn": wsconn_seeds,
    "http_request": http_request_seeds,
    "http_response": http_response_seeds,
    "preamble": preamble_seeds,
    "http1": http1_seeds,
    "hcwire": hcwire_seeds,
    "jws": jws_seeds,
    "est": est_seeds,
    "ztsession": ztsession_seeds,
    "policy": policy_seeds,
    "ippacket": ippacket_seeds,
    "usertoken": usertoken_seeds,
    "acme": acme_seeds,
    "tlshello": tlshello_seeds,
}


def seeds() -> dict:
    """{harness: {file name: bytes}} of every seed."""
    return {h: {"seed-" + name: script_of(mode, pieces) for name, (mode, pieces) in make().items()}
            for h, make in HARNESSES.items()}


def main(argv: list) -> int:
    check = "--check" in argv
    stale = 0
    for h, files in seeds().items():
        d = os.path.join(CORPUS, h)
        os.makedirs(d, exist_ok=True)
        present = {n for n in os.listdir(d) if n.startswith("seed-")}
        for name, blob in files.items():
            path = os.path.join(d, name)
            old = open(path, "rb").read() if name in present else None
            if old == blob:
                continue
            stale += 1
            if check:
                print(f"{path}: {'differs' if old is not None else 'missing'}")
            else:
                with open(path, "wb") as f:
                    f.write(blob)
        for name in sorted(present - set(files)):
            stale += 1
            path = os.path.join(d, name)
            if check:
                print(f"{path}: not made by make_corpus.py")
            else:
                os.remove(path)
    if check:
        return 1 if stale else 0
    print(f"make_corpus: {sum(len(f) for f in seeds().values())} seeds, {stale} written or removed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
