"""WebSocket frames (RFC 6455), sans-I/O: bytes in, events and bytes out.

Theory of operation
-------------------
``FrameParser`` turns a byte stream into events without buffering payload:
data-frame payload is unmasked and handed out as soon as any of it arrives
(``DataFrame`` events carrying a part of a frame, with ``fin`` on the last
part of a message), like the yamux parser does. Only a header split across
reads (at most 13 bytes) and the payload of a control frame (at most 125
bytes) are held. Control frames may arrive between the fragments of a
message, as the RFC allows.

Validation follows RFC 6455 section 5: reserved bits must be 0 (relayd
negotiates no extension), opcodes must be known, control frames must be
final and at most 125 bytes, lengths must use the shortest encoding and fit
in 63 bits, frames from a client must be masked and frames from a server must
not be, continuation frames must continue something, text messages must be
valid UTF-8 (checked incrementally, across fragments), and a close frame's
payload is empty or a valid code plus UTF-8 reason. Any violation ends the
parser with a ``WsProtocolError`` event carrying a ``relayd.errors`` value
and the close code to answer with (1002 protocol error, 1007 bad data, 1009
too big); further input is ignored.

``encode_frame`` builds frames, masking with the given key when the sender
is a client. Masking is the byte loop worth compiling: the pure twin XORs
through Python big integers, the compiled build through 64-bit words.

This file is the one source of both builds (see _yamux_py.py); the
differential tests hold them to identical events and bytes.
"""

from __future__ import annotations

import codecs
import struct

import cython

# The errors are defined once, outside this module, so that both builds raise
# the very same classes (an except clause or isinstance works for either).
from relayd.errors import FrameTooLarge, InvalidFlags, InvalidUtf8, MessageTooBig, ProtocolError, WebSocketError

OP_CONTINUATION = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

_MAX_CONTROL = 125
_MAX_LEN = (1 << 63) - 1


# --- events -------------------------------------------------------------------


@cython.dataclasses.dataclass(frozen=True)
class DataFrame:
    """Part of a text or binary message; ``fin`` on its last part."""

    opcode: int
    data: bytes
    fin: bool


@cython.dataclasses.dataclass(frozen=True)
class Ping:
    data: bytes


@cython.dataclasses.dataclass(frozen=True)
class Pong:
    data: bytes


@cython.dataclasses.dataclass(frozen=True)
class Close:
    """The peer's close frame; ``code`` is 1005 when it carried none."""

    code: int
    reason: str


@cython.dataclasses.dataclass(frozen=True)
class WsProtocolError:
    """Parsing stopped; answer with a close frame of ``close_code``."""

    error: object
    close_code: int


# --- masking ------------------------------------------------------------------------


def mask(data: bytes, key: bytes, offset: cython.Py_ssize_t = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``key``, starting ``offset`` bytes into
    the key cycle (so a frame's payload can be unmasked piece by piece)."""
    n: cython.Py_ssize_t = len(data)
    if n == 0:
        return b""
    if len(key) != 4:
        raise ValueError("a masking key is 4 bytes")
    if cython.compiled:
        out = bytes(n)
        src = cython.cast(cython.p_uchar, cython.cast(cython.p_char, data))
        dst = cython.cast(cython.p_uchar, cython.cast(cython.p_char, out))
        k = cython.cast(cython.p_uchar, cython.cast(cython.p_char, key))
        rot: cython.uchar[8]
        for i in range(8):
            rot[i] = k[(i + offset) & 3]
        memcpy(cython.address(word), cython.address(rot[0]), 8)
        i = 0
        while i + 8 <= n:
            memcpy(cython.address(chunk), src + i, 8)
            chunk ^= word
            memcpy(dst + i, cython.address(chunk), 8)
            i += 8
        while i < n:
            dst[i] = src[i] ^ rot[i & 7]
            i += 1
        return out
    else:
        rotated = key[offset & 3 :] + key[: offset & 3]
        stream = (rotated * (n // 4 + 1))[:n]
        return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


def encode_header(opcode: int, n: int, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """The header of a frame with ``n`` payload bytes (and the masking key,
    if any): lets a sender write an unmasked payload by reference after it."""
    if opcode >= OP_CLOSE and (n > _MAX_CONTROL or not fin):
        raise ValueError("control frames are final and carry at most 125 bytes")
    first = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask_key is not None else 0
    if n < 126:
        head = bytes((first, mbit | n))
    elif n < 65536:
        head = bytes((first, mbit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((first, mbit | 127)) + struct.pack(">Q", n)
    return head if mask_key is None else head + mask_key


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask_key: bytes | None = None) -> bytes:
    """One frame; masked when ``mask_key`` is given (client to server)."""
    head = encode_header(opcode, len(payload), fin, mask_key)
    if mask_key is None:
        return head + payload
    return head + mask(payload, mask_key, 0)


def encode_close(code: int = CLOSE_NORMAL, reason: str = "", mask_key: bytes | None = None) -> bytes:
    payload = struct.pack(">H", code) + reason.encode()[:123]
    return encode_frame(OP_CLOSE, payload, True, mask_key)


# --- parser ----------------------------------------------------------------------------


class FrameParser:
    """Parses frames sent by the peer. ``server=True`` when we are the
    server, i.e. the peer is a client whose frames must be masked."""

    def __init__(self, server: bool, max_message: int = 16 * 1024 * 1024) -> None:
        self.server = server
        self.max_message = max_message
        self._hdr = b""
        self._left = 0  # payload bytes of the current frame still to come
        self._opcode = 0
        self._fin = False
        self._masked = False
        self._key = b""
        self._key_pos = 0
        self._control = b""  # payload of a control frame being collected
        self._msg_opcode = 0  # opcode of the fragmented message in progress
        self._msg_size = 0
        self._utf8 = None
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    def feed(self, data) -> list:
        events = []
        if self._failed:
            return events
        if type(data) is not bytes:
            data = bytes(data)
        try:
            self._parse(data, events)
        except WebSocketError as err:
            self._fail(err, err.close_code, events)
        except FrameTooLarge as err:
            self._fail(err, CLOSE_TOO_BIG, events)
        except ProtocolError as err:
            self._fail(err, CLOSE_PROTOCOL_ERROR, events)
        return events

    def _fail(self, err, code: cython.int, events: list) -> None:
        self._failed = True
        events.append(WsProtocolError(err, code))

    def _parse(self, data: bytes, events: list) -> None:
        pos: cython.Py_ssize_t = 0
        end: cython.Py_ssize_t = len(data)
        n: cython.Py_ssize_t
        while pos < end:
            if self._left:
                n = end - pos
                if n > self._left:
                    n = self._left
                self._payload(data[pos : pos + n], events)
                pos += n
                continue
            # Header: 2 bytes, then 0/2/8 length bytes, then 0/4 key bytes.
            hdr = self._hdr + data[pos : pos + 14]
            need = _header_size(hdr)
            if need < 0 or len(hdr) < need:
                self._hdr = hdr
                return
            pos += need - len(self._hdr)
            self._hdr = b""
            self._header(hdr, events)

    def _header(self, h: bytes, events: list) -> None:
        b0: cython.int = h[0]
        b1: cython.int = h[1]
        if b0 & 0x70:
            raise InvalidFlags("WebSocket frame with reserved bits set (no extension was negotiated)")
        opcode: cython.int = b0 & 0x0F
        fin: cython.bint = (b0 & 0x80) != 0
        masked: cython.bint = (b1 & 0x80) != 0
        short: cython.int = b1 & 0x7F
        length: cython.longlong
        p: cython.Py_ssize_t = 2
        if short == 126:
            length = (h[2] << 8) | h[3]
            p = 4
            if length < 126:
                raise WebSocketError("WebSocket length not in its shortest form")
        elif short == 127:
            if h[2] & 0x80:
                raise WebSocketError("WebSocket length above 2**63")
            length = int.from_bytes(h[2:10], "big")
            p = 10
            if length < 65536:
                raise WebSocketError("WebSocket length not in its shortest form")
        else:
            length = short
        if masked != self.server:
            raise WebSocketError(
                "unmasked frame from a client" if self.server else "masked frame from a server")
        if opcode >= OP_CLOSE:
            if opcode > OP_PONG:
                raise WebSocketError(f"unknown WebSocket opcode {opcode}")
            if not fin:
                raise WebSocketError("fragmented control frame")
            if length > _MAX_CONTROL:
                raise WebSocketError(f"control frame of {length} bytes (at most 125)")
        elif opcode == OP_CONTINUATION:
            if self._msg_opcode == 0:
                raise WebSocketError("continuation frame without a message to continue")
        elif opcode == OP_TEXT or opcode == OP_BINARY:
            if self._msg_opcode != 0:
                raise WebSocketError("new message before the previous one ended")
            self._msg_opcode = opcode
            self._msg_size = 0
            self._utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
        else:
            raise WebSocketError(f"unknown WebSocket opcode {opcode}")
        if opcode < OP_CLOSE:
            # Compare before adding: a 63-bit length would overflow the
            # compiled build's 64-bit counter and slip past the limit.
            if length > self.max_message - self._msg_size:
                raise MessageTooBig(f"WebSocket message above {self.max_message} bytes")
            self._msg_size += length
        self._opcode = opcode
        self._fin = fin
        self._masked = masked
        self._key = h[p : p + 4] if masked else b""
        self._key_pos = 0
        self._left = length
        self._control = b""
        if length == 0:
            self._frame_done(b"", events)

    def _payload(self, part: bytes, events: list) -> None:
        if self._masked:
            part = mask(part, self._key, self._key_pos)
            self._key_pos = (self._key_pos + len(part)) & 3
        self._left -= len(part)
        if self._opcode >= OP_CLOSE:
            self._control += part
            if self._left == 0:
                self._frame_done(self._control, events)
            return
        if self._utf8 is not None:
            try:
                self._utf8.decode(part, self._left == 0 and self._fin)
            except UnicodeDecodeError:
                raise InvalidUtf8("text message is not valid UTF-8") from None
        last: cython.bint = self._left == 0 and self._fin
        events.append(DataFrame(self._msg_opcode, part, last))
        if last:
            self._msg_opcode = 0
            self._utf8 = None

    def _frame_done(self, payload: bytes, events: list) -> None:
        """A frame whose whole payload (possibly empty) is in hand."""
        op: cython.int = self._opcode
        if op == OP_PING:
            events.append(Ping(payload))
        elif op == OP_PONG:
            events.append(Pong(payload))
        elif op == OP_CLOSE:
            events.append(_parse_close(payload))
        else:
            # An empty data frame: still an event, it may end the message.
            if self._utf8 is not None and self._fin:
                try:
                    self._utf8.decode(b"", True)
                except UnicodeDecodeError:
                    raise InvalidUtf8("text message is not valid UTF-8") from None
            events.append(DataFrame(self._msg_opcode, b"", self._fin))
            if self._fin:
                self._msg_opcode = 0
                self._utf8 = None


def _header_size(h: bytes) -> cython.Py_ssize_t:
    """Bytes the header in ``h`` needs, or -1 if that is not known yet."""
    if len(h) < 2:
        return -1
    short: cython.int = h[1] & 0x7F
    size: cython.Py_ssize_t = 2 + (2 if short == 126 else 8 if short == 127 else 0)
    if h[1] & 0x80:
        size += 4
    return size


def _parse_close(payload: bytes) -> Close:
    if len(payload) == 0:
        return Close(1005, "")
    if len(payload) == 1:
        raise WebSocketError("close frame with a 1-byte payload")
    code: cython.int = (payload[0] << 8) | payload[1]
    if not (code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
            or 3000 <= code <= 4999):
        raise WebSocketError(f"close code {code} is not allowed on the wire")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUtf8("close reason is not valid UTF-8") from None
    return Close(code, reason)
