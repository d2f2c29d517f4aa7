"""Length-prefixed msgpack messages: stream-open headers and link handshakes.

Every stream the relay opens toward an agent starts with one header message
(endpoint, trace id, client address); the agent link and enrollment start
with one request and one reply. Each message is a 4-byte big-endian length
and a msgpack map. Sans-I/O: ``MessageReader.feed`` takes bytes and returns
the message once complete, plus whatever bytes followed it.
"""

from __future__ import annotations

import struct

import msgpack

from relayd.errors import ProtocolError

_LEN = struct.Struct(">I")
MAX_MESSAGE = 64 * 1024


class FramingError(ProtocolError):
    """A length-prefixed message that is too large or not a msgpack map."""


def encode_message(message: dict, limit: int = MAX_MESSAGE) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > limit:
        raise ValueError(f"message of {len(body)} bytes exceeds {limit}")
    return _LEN.pack(len(body)) + body


class MessageReader:
    """Collects one message from arbitrary splits of the byte stream."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> tuple[dict | None, bytes]:
        """Returns (message, rest) once complete, else (None, b"")."""
        self._buf += data
        if len(self._buf) < 4:
            return None, b""
        n = message_length(bytes(self._buf[:4]), self._limit)
        if len(self._buf) < 4 + n:
            return None, b""
        body = bytes(self._buf[4 : 4 + n])
        rest = bytes(self._buf[4 + n :])
        self._buf.clear()
        return decode_body(body), rest


def message_length(prefix: bytes, limit: int = MAX_MESSAGE) -> int:
    """The body length a 4-byte prefix announces, within ``limit``."""
    (n,) = _LEN.unpack(prefix)
    if n > limit:
        raise FramingError(f"message of {n} bytes exceeds the limit of {limit}")
    return n


def decode_body(body: bytes) -> dict:
    """A message body (msgpack map) -> dict; the one decoder of messages."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise FramingError(f"message is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise FramingError(f"message is a {type(message).__name__}, not a map")
    return message


# -- IP packets (zero-trust TUN mode) ------------------------------------------
#
# A packet stream carries whole IP packets, each a 2-byte big-endian length
# and the packet (at most 65,535 bytes, as IP's own length field allows).

_PLEN = struct.Struct(">H")


def frame_packet(pkt: bytes) -> bytes:
    if not 0 < len(pkt) <= 0xFFFF:
        raise ValueError(f"a packet of {len(pkt)} bytes")
    return _PLEN.pack(len(pkt)) + pkt


class PacketSplitter:
    """Whole packets out of arbitrary splits of a packet stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out = []
        i, n = 0, len(buf)
        while n - i >= 2:
            size = (buf[i] << 8) | buf[i + 1]
            if size == 0:
                raise FramingError("a packet of 0 bytes")
            if n - i - 2 < size:
                break
            out.append(bytes(buf[i + 2 : i + 2 + size]))
            i += 2 + size
        del buf[:i]
        return out
