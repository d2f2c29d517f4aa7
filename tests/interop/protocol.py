"""Stream protocol shared by relayd's interop tests and the Go peer.

Must match tests/interop/yamuxpeer/main.go byte for byte.

    header  = op (1 byte) | seed (uint64 BE) | length L (uint64 BE)   (17 bytes)
    ks(s,n) = first n bytes of the AES-128-CTR keystream, i.e. the encryption
              of n zero bytes; key = seed as 8 bytes BE repeated twice (16 B),
              IV = 16 zero bytes (the whole block is the big-endian counter).
              seed + 1 is taken modulo 2**64.

op 'E' (echo)
    OPENER:   header, ks(seed, L), FIN; then read to EOF and expect exactly
              SHA-256(ks(seed, L)) (32 bytes) + ks(seed+1, L), then EOF.
    ACCEPTOR: read header, read the payload up to EOF (must be exactly L
              bytes); only then write SHA-256(payload), ks(seed+1, L), FIN.
op 'R' (reset probe)
    OPENER:   header with L = 0, no payload, no FIN; then read: a reset counts
              as "reset seen"; EOF means the acceptor could not reset and
              answered with FIN (the Go peer: hashicorp/yamux 2019 has no
              public stream reset), then the opener FINs as well.
    ACCEPTOR: reset (RST) the stream right after the header.
empty stream
    A stream that reaches EOF before any header byte is a no-op probe (the Go
    peer opens such streams while polling for the peer's GoAway). The acceptor
    answers with FIN; it is not a protocol stream and should not be counted.

Why the acceptor reads to EOF before writing: in the Go snapshot a side that
has sent FIN gets a premature EOF from Stream.Read as soon as its receive
buffer is empty (fixed upstream only in v0.1.2). The acceptor therefore never
reads after its own FIN. The Go *opener* must read after its FIN and works
around it by relying on the known reply length. A second Go defect: a DATA
frame carrying FIN and payload can let a Go reader see EOF before that frame's
payload is buffered; the Go peer guards against that with a ping barrier, but
a plain Go application would lose the tail, so relayd sending FIN in a
separate zero-length frame is the kinder behaviour towards that yamux.

The stream object is relayd's MuxStream-like API: ``stream_id``, ``async
read(max_bytes=65536) -> bytes`` (b'' at EOF, raises
relayd.errors.StreamResetError on RST), ``async write(data)`` (waits for the
flow-control window), ``write_eof()`` (FIN) and ``reset()`` (RST). The
functions impose no timeouts: wrap them in asyncio.wait_for.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any, Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "HEADER", "HEADER_SIZE", "OP_ECHO", "OP_RESET", "DIGEST_SIZE", "CHUNK_SIZE",
    "SEED_MASK", "ProtocolError", "ChecksumError", "encode_header",
    "decode_header", "keystream", "iter_keystream", "keystream_sha256",
    "run_opener", "run_acceptor",
]

HEADER = struct.Struct(">cQQ")
HEADER_SIZE = HEADER.size  # 17
OP_ECHO = b"E"
OP_RESET = b"R"
DIGEST_SIZE = 32
CHUNK_SIZE = 256 * 1024
SEED_MASK = (1 << 64) - 1
_ZEROS = memoryview(bytes(CHUNK_SIZE))

assert HEADER_SIZE == 17


class ProtocolError(AssertionError):
    """The peer violated the stream protocol (short/long data, bad op...)."""


class ChecksumError(ProtocolError):
    """Data arrived complete but did not match the expected content."""


def encode_header(op: bytes, seed: int, length: int) -> bytes:
    return HEADER.pack(op, seed & SEED_MASK, length)


def decode_header(data: bytes) -> tuple[bytes, int, int]:
    op, seed, length = HEADER.unpack(data)
    return op, seed, length


def _encryptor(seed: int):
    key = struct.pack(">Q", seed & SEED_MASK) * 2
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


def iter_keystream(seed: int, length: int, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield ks(seed, length) in chunks of at most chunk_size bytes (one CTR encryptor)."""
    if chunk_size > CHUNK_SIZE:
        zeros = memoryview(bytes(chunk_size))
    else:
        zeros = _ZEROS
    enc = _encryptor(seed)
    remaining = length
    while remaining > 0:
        n = min(remaining, chunk_size)
        yield enc.update(zeros[:n])
        remaining -= n


def keystream(seed: int, length: int) -> bytes:
    """ks(seed, length) as one bytes object (use iter_keystream for big lengths)."""
    if length <= 0:
        return b""
    return _encryptor(seed).update(bytes(length))


def keystream_sha256(seed: int, length: int) -> bytes:
    h = hashlib.sha256()
    for chunk in iter_keystream(seed, length):
        h.update(chunk)
    return h.digest()


def _reset_error_type() -> type[BaseException]:
    from relayd.errors import StreamResetError  # lead's API; imported lazily

    return StreamResetError


async def _read_exact(stream: Any, n: int, what: str, got_so_far: int = 0) -> bytes:
    """Read exactly n bytes (n <= CHUNK_SIZE keeps the buffers small)."""
    first = await stream.read(n)
    if len(first) == n:
        return first
    if not first:
        raise ProtocolError(f"stream {stream.stream_id}: EOF in {what} after {got_so_far} bytes")
    parts = [first]
    have = len(first)
    while have < n:
        data = await stream.read(n - have)
        if not data:
            raise ProtocolError(
                f"stream {stream.stream_id}: EOF in {what} after {got_so_far + have} bytes")
        parts.append(data)
        have += len(data)
    return b"".join(parts)


async def run_opener(stream: Any, seed: int, length: int, *, op: bytes = OP_ECHO,
                     chunk_size: int = CHUNK_SIZE) -> dict:
    """Run the OPENER side on a freshly opened stream.

    op 'E': returns stats; raises ChecksumError (an AssertionError) if the
    digest or the reply body is wrong, ProtocolError on short/long replies.
    StreamResetError from the stream propagates.
    op 'R': returns {'op': 'R', 'reset': True} if the peer reset the stream,
    {'reset': False} if it answered with FIN (we FIN back then).
    """
    seed &= SEED_MASK
    t0 = time.monotonic()
    if op == OP_RESET:
        await stream.write(encode_header(OP_RESET, seed, 0))
        reset_error = _reset_error_type()
        try:
            data = await stream.read(1)
        except reset_error:
            return {"op": "R", "stream_id": stream.stream_id, "reset": True,
                    "bytes_sent": HEADER_SIZE, "bytes_received": 0}
        if data:
            raise ProtocolError(f"stream {stream.stream_id}: reset probe got data {data[:16]!r}")
        stream.write_eof()
        return {"op": "R", "stream_id": stream.stream_id, "reset": False,
                "bytes_sent": HEADER_SIZE, "bytes_received": 0}
    if op != OP_ECHO:
        raise ValueError(f"unknown op {op!r}")

    await stream.write(encode_header(OP_ECHO, seed, length))
    sent_hash = hashlib.sha256()
    for chunk in iter_keystream(seed, length, chunk_size):
        sent_hash.update(chunk)
        await stream.write(chunk)
    stream.write_eof()
    t_sent = time.monotonic()

    digest = await _read_exact(stream, DIGEST_SIZE, "reply digest")
    got_hash = hashlib.sha256()
    want_hash = hashlib.sha256()
    received = 0
    for expected_chunk in iter_keystream((seed + 1) & SEED_MASK, length, chunk_size):
        want_hash.update(expected_chunk)
        data = await _read_exact(stream, len(expected_chunk), "reply body", received)
        got_hash.update(data)
        received += len(data)
    extra = await stream.read(1)
    if extra:
        raise ProtocolError(f"stream {stream.stream_id}: data after the {length}-byte reply")
    problems = []
    if digest != sent_hash.digest():
        problems.append(f"digest {digest.hex()} != sha256(payload) {sent_hash.hexdigest()}")
    if got_hash.digest() != want_hash.digest():
        problems.append(f"reply body sha256 {got_hash.hexdigest()} != {want_hash.hexdigest()}")
    if problems:
        raise ChecksumError(f"stream {stream.stream_id} seed {seed}: " + "; ".join(problems))
    t_end = time.monotonic()
    return {"op": "E", "stream_id": stream.stream_id, "seed": seed, "length": length,
            "bytes_sent": HEADER_SIZE + length, "bytes_received": DIGEST_SIZE + length,
            "send_s": t_sent - t0, "total_s": t_end - t0}


async def run_acceptor(stream: Any, *, verify_payload: bool = True,
                       chunk_size: int = CHUNK_SIZE) -> dict:
    """Run the ACCEPTOR side on an accepted stream.

    Returns stats. For an empty probe stream: {'op': None, 'empty': True}.
    For 'R': resets the stream, returns {'op': 'R', 'reset_sent': True}.
    For 'E' with verify_payload, a payload that differs from ks(seed, L) raises
    ChecksumError *after* the reply has been sent (the opener detects it too).
    Raises ProtocolError on a bad header/op or a payload whose length != L.
    """
    t0 = time.monotonic()
    first = await stream.read(HEADER_SIZE)
    if not first:
        stream.write_eof()
        return {"op": None, "empty": True, "stream_id": stream.stream_id}
    if len(first) < HEADER_SIZE:
        first += await _read_exact(stream, HEADER_SIZE - len(first), "header", len(first))
    op, seed, length = decode_header(first)
    if op == OP_RESET:
        stream.reset()
        return {"op": "R", "stream_id": stream.stream_id, "reset_sent": True,
                "bytes_received": HEADER_SIZE, "bytes_sent": 0}
    if op != OP_ECHO:
        stream.reset()
        raise ProtocolError(f"stream {stream.stream_id}: unknown op {op!r}")

    h = hashlib.sha256()
    expected = iter_keystream(seed, length, chunk_size) if verify_payload else None
    pending = memoryview(b"")  # unmatched part of the current expected chunk
    payload_ok = True
    received = 0
    while True:
        data = await stream.read(chunk_size)
        if not data:
            break
        received += len(data)
        if received > length:
            stream.reset()
            raise ProtocolError(
                f"stream {stream.stream_id}: payload longer than announced {length} bytes")
        h.update(data)
        if expected is not None and payload_ok:
            view = memoryview(data)
            while view:
                if not pending:
                    pending = memoryview(next(expected))
                n = min(len(pending), len(view))
                if view[:n] != pending[:n]:
                    payload_ok = False
                    break
                pending = pending[n:]
                view = view[n:]
    if received != length:
        stream.reset()
        raise ProtocolError(
            f"stream {stream.stream_id}: payload {received} bytes, header said {length}")
    t_recv = time.monotonic()

    await stream.write(h.digest())
    for chunk in iter_keystream((seed + 1) & SEED_MASK, length, chunk_size):
        await stream.write(chunk)
    stream.write_eof()
    if not payload_ok:
        raise ChecksumError(
            f"stream {stream.stream_id} seed {seed}: received payload differs from keystream")
    return {"op": "E", "stream_id": stream.stream_id, "seed": seed, "length": length,
            "bytes_received": HEADER_SIZE + length, "bytes_sent": DIGEST_SIZE + length,
            "payload_ok": payload_ok if verify_payload else None,
            "recv_s": t_recv - t0, "total_s": time.monotonic() - t0}
