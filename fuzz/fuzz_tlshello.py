"""Fuzz relayd's ClientHello reader (relayd/core/tlshello.py), as the HTTPS
listener uses it on the bytes it peeks at. Pure Python only.

The wire bytes arrive in the fuzzer's reads; after each, the listener's
steps are taken on everything so far: ``record_length``, then, once the
record is whole, ``parse_client_hello``. Mode bit 0: a real ClientHello
(SNI ``app.example``, ALPN ``acme-tls/1`` and ``relayd``) is put first.

Oracles: nothing but ``HelloError`` escapes; a record length is that of a
record of at most 2^14 bytes; the outcome depends only on the first record
(bytes after it change nothing) and not on how the bytes were cut; a server
name is lower-case visible ASCII, ALPN names are 1 to 255 bytes.

    python fuzz/fuzz_tlshello.py [libFuzzer options] [corpus dirs or a crash file]
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fuzz import harness
from fuzz.harness import Finding, check

with harness.instrumented(__name__ == "__main__"):
    from relayd.core import tlshello

def _vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def client_hello(server_name: bytes | None = b"app.example", alpn=(b"acme-tls/1", b"relayd"),
                 extensions: bytes = b"", session_id: bytes = b"\x22" * 32) -> bytes:
    """A ClientHello record as TLS 1.3 clients send it, built from its parts
    (fixed bytes, so that an input replays the same way); ``extensions`` go
    after SNI and ALPN."""
    ext = b""
    if server_name is not None:
        ext += b"\x00\x00" + _vec(2, _vec(2, b"\x00" + _vec(2, server_name)))
    if alpn:
        ext += b"\x00\x10" + _vec(2, _vec(2, b"".join(_vec(1, p) for p in alpn)))
    ext += b"\x00\x2b\x00\x03\x02\x03\x04" + extensions  # supported_versions: TLS 1.3
    body = (b"\x03\x03" + b"\x11" * 32 + _vec(1, session_id) + _vec(2, b"\x13\x01\x13\x02\xc0\x2f")
            + b"\x01\x00" + _vec(2, ext))
    return b"\x16\x03\x01" + _vec(2, b"\x01" + _vec(3, body))


GOOD = client_hello()


def _outcome(data: bytes):
    try:
        total = tlshello.record_length(data)
        if total is None or len(data) < total:
            return ("partial", total)
        return ("hello", tlshello.parse_client_hello(data))
    except tlshello.HelloError as exc:
        return ("error", str(exc))


def test_one_input(data: bytes) -> None:
    script = harness.Script(data)
    seen = GOOD if script.mode & 1 else b""
    last = None
    try:
        for _, chunk, _ in script.reads():
            seen += chunk
            last = _outcome(seen)
            if last[0] == "partial" and last[1] is not None:
                check(6 <= last[1] <= 5 + tlshello.MAX_RECORD, f"record length {last[1]}")
            if last[0] != "partial":
                break
        if last is None:
            last = _outcome(seen)
    except Finding:
        raise
    except Exception as exc:
        raise Finding(f"{type(exc).__name__} escaped: {exc!r}"[:300]) from exc
    if last[0] == "hello":
        hello = last[1]
        check(_outcome(seen + b"\x17\x03\x03\x00\x01x") == last, "bytes after the record changed the outcome")
        check(_outcome(bytes(seen)) == last, "outcome depends on the cut of the reads")
        name = hello.server_name
        check(name is None or (name.isascii() and name == name.lower() and all(33 <= ord(c) < 127 for c in name)),
              f"server name {name!r:.80}")
        check(all(1 <= len(p) <= 255 for p in hello.alpn), "ALPN name length")


if __name__ == "__main__":
    harness.main(test_one_input)
