"""WebSocket (RFC 6455), sans-I/O: bytes in, events and bytes out.

Theory of operation
-------------------
Two layers, one source for both builds.

``FrameParser`` turns a byte stream into frame events without buffering
payload: data-frame payload is unmasked and handed out as soon as any of it
arrives (``DataFrame`` events carrying a part of a frame, with ``fin`` on the
last part of a message), like the yamux parser does. Only a header split
across reads (at most 14 bytes) and the payload of a control frame (at most
125 bytes) are held. Control frames may arrive between the fragments of a
message, as the RFC allows.

Validation follows RFC 6455 section 5: reserved bits must be 0 (relayd
negotiates no extension), opcodes must be known, control frames must be
final and at most 125 bytes, lengths must use the shortest encoding and fit
in 63 bits, frames from a client must be masked and frames from a server must
not be, continuation frames must continue something, text messages must be
valid UTF-8 (checked incrementally, across fragments), and a close frame's
payload is empty or a code allowed on the wire (section 7.4) plus a UTF-8
reason. Any violation ends the parser with a ``WsProtocolError`` event
carrying a ``relayd.errors`` value and the close code to answer with (1002
protocol error, 1007 bad data, 1009 too big); further input is ignored.

``Connection`` is the WebSocket connection after the opening handshake (the
handshake itself is relayd.core.wshandshake: it works on parsed HTTP heads),
shaped like the ``websockets`` package's protocol object: ``receive_data``
takes bytes and returns events; ``send_*`` queue frames; ``data_to_send``
hands out the bytes to write. It answers pings (auto-pong), runs the closing
handshake (echoes the peer's close, or waits for the answer to its own), fails
the connection with the right close code on a violation, and applies the
limits of a ``WsConfig``. Messages come out either as they arrive
(``DataFrame`` parts: for splicing, nothing is held) or assembled
(``TextMessage``/``BinaryMessage``: for control channels, held up to
``max_message``). State: OPEN, then CLOSING (we sent a close and wait for
the peer's), then CLOSED (both sent, or failed, or the transport ended).
After the peer's close or a failure, further input is discarded (RFC 6455
1.4, 7.1.7); ``should_close_transport`` tells the I/O layer when to end TCP.

``encode_frame`` builds frames, masking with the given key when the sender
is a client. Masking is the byte loop worth compiling: the pure twin XORs
through Python big integers, the compiled build through 64-bit words.

This file is the one source of both builds (see _yamux_py.py); the
differential tests hold them to identical events and bytes. Events live in
relayd.core.ws_events, errors in relayd.errors: one class each, both builds.
"""

from __future__ import annotations

import codecs
import os
import struct

import cython

# Errors and events are defined once, outside this module, so that both
# builds raise and return the very same classes (an except clause, isinstance
# or ``type(ev) is Ping`` works for either).
from relayd.core.ws_events import (BinaryMessage, Close, DataFrame, Ping, Pong, TextMessage,
                                   WsProtocolError)
from relayd.core.wsconfig import WsConfig
from relayd.errors import (FrameTooLarge, InvalidFlags, InvalidUtf8, MessageTooBig, ProtocolError,
                           SessionClosedError, WebSocketError, WebSocketFlood, WebSocketStateError)

OP_CONTINUATION = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011

#: Connection states.
OPEN = 1
CLOSING = 2
CLOSED = 3

_MAX_CONTROL = 125


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
    """A close frame; a reason above 123 bytes is cut at a character
    boundary (a cut inside a character would be invalid UTF-8: a 1007)."""
    return encode_frame(OP_CLOSE, struct.pack(">H", code) + _reason_bytes(reason), True, mask_key)


def _reason_bytes(reason: str) -> bytes:
    b = reason.encode()
    if len(b) > 123:
        b = b[:123].decode("utf-8", "ignore").encode()
    return b


def close_code_allowed(code: cython.int) -> cython.bint:
    """May ``code`` travel in a close frame (RFC 6455 7.4)? 1005, 1006 and
    1015 are for reporting only; 1004 is reserved; 1012-1014 are registered
    with IANA; 3000-4999 belong to libraries and applications."""
    return (1000 <= code <= 1003 or 1007 <= code <= 1014) or 3000 <= code <= 4999


# --- parser ----------------------------------------------------------------------------


class FrameParser:
    """Parses frames sent by the peer. ``server=True`` when we are the
    server, i.e. the peer is a client whose frames must be masked."""

    def __init__(self, server: bool, max_message: int = 16 * 1024 * 1024, max_frame: int = -1) -> None:
        self.server = server
        self.max_message = max_message
        # One frame's payload; by default only the message limit applies.
        self.max_frame = max_message if max_frame < 0 else max_frame
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
            if length > self.max_frame:
                raise MessageTooBig(f"WebSocket frame above {self.max_frame} bytes")
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
    if not close_code_allowed(code):
        raise WebSocketError(f"close code {code} is not allowed on the wire")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidUtf8("close reason is not valid UTF-8") from None
    return Close(code, reason)


# --- connection -------------------------------------------------------------------------


class Connection:
    """One WebSocket connection after the opening handshake, sans-I/O.

    ``client`` is our role (a client masks what it sends and expects
    unmasked frames). ``assemble`` chooses how messages come out: whole
    (``TextMessage``/``BinaryMessage``) or as they arrive (``DataFrame``
    parts). ``random`` gives the 4-byte masking keys (os.urandom; a test
    passes its own to compare bytes).
    """

    def __init__(self, client: bool, config: WsConfig | None = None, assemble: bool = True, random=None) -> None:
        if config is None:
            config = WsConfig()
        self.client = client
        self.config = config
        self.assemble = assemble
        self.state = OPEN
        #: The peer's close code (1005: its close frame had none; 1006: the
        #: transport ended without one); 0 while no close came.
        self.close_code = 0
        self.close_reason = ""
        #: The code of the close frame we sent (0: none sent).
        self.close_sent = 0
        #: The relayd.errors value that failed the connection, or None.
        self.error = None
        self._parser = FrameParser(not client, config.max_message, config.max_frame)
        self._max_buffered = config.max_buffered
        self._random = os.urandom if random is None else random
        self._out = []
        self._out_size = 0
        self._sending = 0  # opcode of our fragmented message in progress
        self._parts = []  # the message being assembled
        self._discard = False  # the peer's close came, or we failed: input is ignored
        self._eof = False

    # -- input --------------------------------------------------------------------------

    def receive_data(self, data) -> list:
        """Bytes from the peer; returns the events they complete. Answers
        (pongs, the close) are queued for data_to_send()."""
        events = []
        if self._discard or self._eof:
            return events
        pevs = self._parser.feed(data)
        n: cython.Py_ssize_t = len(pevs)
        i: cython.Py_ssize_t
        for i in range(n):
            ev = pevs[i]
            cls = type(ev)
            if cls is DataFrame:
                if self.assemble:
                    self._assemble(ev, events)
                else:
                    events.append(ev)
            elif cls is Ping:
                # RFC 6455 5.5.2: answer unless the peer's close came (then
                # input is discarded and we never get here).
                if self._out_size + len(ev.data) + 6 > self._max_buffered:
                    self._protocol_error(
                        WebSocketFlood(f"pings would queue more than {self._max_buffered} bytes of pongs"),
                        CLOSE_POLICY, events)
                    return events
                self._queue_frame(OP_PONG, ev.data, True)
                events.append(ev)
            elif cls is Pong:
                events.append(ev)
            elif cls is Close:
                self._close_received(ev, events)
                return events
            else:  # WsProtocolError
                self._protocol_error(ev.error, ev.close_code, events)
                return events
        return events

    def receive_eof(self) -> list:
        """The transport ended (or the peer half-closed). Returns no events:
        ``close_code`` says how it ended (1006 without a close frame)."""
        self._eof = True
        if self.close_code == 0:
            self.close_code = CLOSE_ABNORMAL
        self.state = CLOSED
        self._parts = []
        return []

    def _assemble(self, ev, events: list) -> None:
        if ev.data:
            self._parts.append(ev.data)
        if not ev.fin:
            return
        data = b"".join(self._parts)
        self._parts = []
        if ev.opcode == OP_TEXT:
            # Already checked by the parser: decoding cannot fail.
            events.append(TextMessage(data.decode("utf-8")))
        else:
            events.append(BinaryMessage(data))

    def _close_received(self, ev, events: list) -> None:
        self.close_code = ev.code
        self.close_reason = ev.reason
        self._discard = True
        self._parts = []
        if self.close_sent == 0:
            # 5.5.1: answer a close with a close, echoing the code.
            if ev.code == CLOSE_NO_STATUS:
                self._queue_frame(OP_CLOSE, b"", True)
            else:
                self._queue_frame(OP_CLOSE, struct.pack(">H", ev.code) + ev.reason.encode(), True)
            self.close_sent = ev.code
        self.state = CLOSED
        events.append(ev)

    def _protocol_error(self, err, code: cython.int, events: list) -> None:
        self.error = err
        self.fail(code, str(err))
        events.append(WsProtocolError(err, code))

    # -- output -------------------------------------------------------------------------

    def send_text(self, data, fin: bool = True) -> None:
        """A text message, or its first part (``fin=False``). ``data`` is a
        str, or bytes the caller guarantees to be UTF-8."""
        if type(data) is str:
            data = data.encode("utf-8")
        self._send_data(OP_TEXT, data, fin)

    def send_binary(self, data, fin: bool = True) -> None:
        """A binary message, or its first part. ``data`` is bytes-like, or a
        list of them (one frame; a server writes them by reference)."""
        self._send_data(OP_BINARY, data, fin)

    def send_continuation(self, data, fin: bool) -> None:
        """The next part of the message begun with ``fin=False``."""
        if self._sending == 0:
            raise WebSocketStateError("no fragmented message to continue")
        if type(data) is str:
            data = data.encode("utf-8")
        self._send_data(OP_CONTINUATION, data, fin)

    def _send_data(self, opcode: cython.int, data, fin: cython.bint) -> None:
        if self.state != OPEN:
            raise SessionClosedError("the WebSocket connection is closing or closed")
        if opcode != OP_CONTINUATION and self._sending != 0:
            raise WebSocketStateError("a new message inside a fragmented one (send_continuation first)")
        self._sending = 0 if fin else (opcode if opcode != OP_CONTINUATION else self._sending)
        if type(data) is list or type(data) is tuple:
            if self.client or len(data) == 1:
                data = b"".join(data) if len(data) != 1 else data[0]
            else:
                n: cython.Py_ssize_t = 0
                for b in data:
                    n += len(b)
                self._out.append(encode_header(opcode, n, fin, None))
                self._out.extend(data)
                self._out_size += n + 10
                return
        self._queue_frame(opcode, data, fin)

    def send_ping(self, data=b"") -> None:
        """A ping (at most 125 bytes); the peer's pong comes as a Pong event."""
        self._check_control(data)
        self._queue_frame(OP_PING, bytes(data), True)

    def send_pong(self, data=b"") -> None:
        """An unsolicited pong (a keepalive that expects no answer)."""
        self._check_control(data)
        self._queue_frame(OP_PONG, bytes(data), True)

    def _check_control(self, data) -> None:
        if self.state == CLOSED:
            raise SessionClosedError("the WebSocket connection is closed")
        if len(data) > _MAX_CONTROL:
            raise ValueError("a control frame carries at most 125 bytes")

    def send_close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the closing handshake: no data is sent after this; the
        connection is CLOSED when the peer's close arrives."""
        if self.state != OPEN:
            raise SessionClosedError("the WebSocket connection is closing or closed")
        if not close_code_allowed(code):
            raise ValueError(f"close code {code} may not be sent (RFC 6455 7.4)")
        payload = reason.encode("utf-8")
        if len(payload) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        self._queue_frame(OP_CLOSE, struct.pack(">H", code) + payload, True)
        self.close_sent = code
        self.state = CLOSING

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close with ``code``
        unless one was sent, ignore all further input; the I/O layer should
        then end the transport. ``reason`` is cut to fit (123 bytes)."""
        if not close_code_allowed(code):
            raise ValueError(f"close code {code} may not be sent (RFC 6455 7.4)")
        if self.close_sent == 0 and not self._eof:
            self._queue_frame(OP_CLOSE, struct.pack(">H", code) + _reason_bytes(reason), True)
            self.close_sent = code
        self._discard = True
        self._parts = []
        self.state = CLOSED

    def _queue_frame(self, opcode: cython.int, data, fin: cython.bint) -> None:
        n: cython.Py_ssize_t = len(data)
        if self.client:
            key = self._random(4)
            frame = encode_header(opcode, n, fin, key) + mask(bytes(data), key, 0)
            self._out.append(frame)
            self._out_size += len(frame)
        else:
            self._out.append(encode_header(opcode, n, fin, None))
            if n:
                self._out.append(data)
            self._out_size += n + 10

    def data_to_send(self) -> bytes:
        """The bytes to write now (empty when there are none)."""
        out = self._out
        if not out:
            return b""
        self._out = []
        self._out_size = 0
        return out[0] if len(out) == 1 and type(out[0]) is bytes else b"".join(out)

    def data_to_send_list(self) -> list:
        """The same as a list of buffers, for transport.writelines (a
        server's payloads are not copied)."""
        out = self._out
        self._out = []
        self._out_size = 0
        return out

    # -- state --------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def should_close_transport(self) -> bool:
        """True when the I/O layer should end the transport now: the closing
        handshake is done and we are the server (a client waits for the
        server to end TCP, up to ``close_timeout``), or the connection failed."""
        return self.state == CLOSED and not self._eof and (not self.client or self.error is not None
                                                            or self.close_code == 0)
