"""Helpers to write raw yamux frames as a peer would (from the pure codec)."""

import struct

from relayd.core import _yamux_py as K


def frame(typ, flags, sid, length, payload=b""):
    return struct.pack(">BBHII", 0, typ, flags, sid, length) + payload


def data(sid, payload, flags=0):
    return frame(K.TYPE_DATA, flags, sid, len(payload), payload)


def wnd(sid, delta, flags=0):
    return frame(K.TYPE_WINDOW_UPDATE, flags, sid, delta)


def syn(sid, delta=0):
    return wnd(sid, delta, K.FLAG_SYN)


def ping(opaque, flags=1):
    return frame(K.TYPE_PING, flags, 0, opaque)


def goaway(code):
    return frame(K.TYPE_GO_AWAY, 0, 0, code)


def parse_frames(buf):
    """Split an outbound buffer into (type, flags, sid, length, payload)."""
    out, pos = [], 0
    buf = bytes(buf)
    while pos < len(buf):
        v, t, f, s, ln = struct.unpack_from(">BBHII", buf, pos)
        assert v == 0
        pos += 12
        body = b""
        if t == K.TYPE_DATA:
            body = buf[pos : pos + ln]
            pos += ln
        out.append((t, f, s, ln, body))
    return out


def describe(ev):
    """A build-independent description of an event, for comparisons."""
    name = type(ev).__name__
    if name == "ProtocolErrorEvent":
        return (name, type(ev.error).__name__, str(ev.error))
    fields = [f for f in ("stream_id", "data", "delta", "opaque", "code") if hasattr(ev, f)]
    return (name,) + tuple(getattr(ev, f) for f in fields)
