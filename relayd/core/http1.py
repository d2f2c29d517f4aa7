"""HTTP/1.x heads: the one parser and the one set of limits.

Every place in relayd that reads an HTTP/1 head uses this module: the HTTPS
front door (relayd.net.wslink) and the ingress's framing behind it
(relayd.core._h1proxy_py, which checks whole heads with REQUEST_HEAD and
RESPONSE_HEAD: the same grammar at C speed), the agent's WebSocket upgrade, the forward proxy's CONNECT reply and
the metrics listener. Sans-I/O: bytes in, values or ``HeadError`` out.

The grammar is RFC 9112's, strictly: a request line ``method SP target SP
HTTP/1.x`` (empty lines before it are skipped, RFC 9112 2.2), field lines
``token ":" OWS value OWS``, CRLF only (a bare CR or LF, NUL, obs-fold and
whitespace before the colon are refused), at most ``max_headers`` fields in at
most ``max_head`` bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from relayd.core.config import _checker
from relayd.errors import ProtocolError


@dataclass(frozen=True)
class HttpLimits:
    """The limits of HTTP/1 in relayd, in one place: every head it reads
    (requests and responses), and the HTTPS port's connections. The ``[http]``
    table of the relay's config sets them (relayd.config); docs/security.md
    lists them."""

    #: Bytes of one head, request or status line included.
    max_head: int = 32 * 1024
    #: Header fields in one head.
    max_headers: int = 100
    #: Seconds a client has for its first whole head on a new connection.
    head_timeout: float = 10.0
    #: Seconds a kept-alive client connection may sit idle between requests.
    idle_timeout: float = 60.0
    #: Pipelined requests waiting behind the one in flight.
    max_queued_requests: int = 16
    #: Bytes of request bodies (and of bytes after an upgrade request) held
    #: while they cannot go on; reading from the client pauses beyond.
    max_queued_body: int = 1024 * 1024
    #: Bytes of one chunk-size line of a chunked body (extensions included).
    max_chunk_line: int = 4096

    def __post_init__(self) -> None:
        need = _checker(self, "http")
        need(1024 <= self.max_head <= 1024 * 1024, "max_head", "must be between 1024 and 1048576 bytes")
        need(8 <= self.max_headers <= 1000, "max_headers", "must be between 8 and 1000")
        need(0 < self.head_timeout <= 300, "head_timeout", "must be between 0 and 300 seconds")
        need(0 < self.idle_timeout <= 3600, "idle_timeout", "must be between 0 and 3600 seconds")
        need(0 <= self.max_queued_requests <= 1024, "max_queued_requests", "must be between 0 and 1024")
        need(0 <= self.max_queued_body <= 64 * 1024 * 1024, "max_queued_body", "must be between 0 and 64 MiB")
        need(64 <= self.max_chunk_line <= 64 * 1024, "max_chunk_line", "must be between 64 and 65536 bytes")


LIMITS = HttpLimits()

REASONS = {101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
           308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 412: "Precondition Failed", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content", 426: "Upgrade Required",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class HeadError(ProtocolError):
    """A head that is not HTTP/1.x as RFC 9112 writes it, or over a limit;
    ``status`` is the answer a server gives (400 or 431)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# Field values and reason phrases: HTAB, SP, visible characters, obs-text;
# no other control character (RFC 9110 5.5, RFC 9112 4).
_TEXT = rb"[^\x00-\x08\x0a-\x1f\x7f]"
REQUEST_LINE = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]\r\n")
_REQUEST_LINE_PARTS = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])\Z")
_STATUS_LINE_PARTS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: (" + _TEXT + rb"*))?\Z")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _TEXT + rb"*?)[ \t]*\Z")
#: A whole request head (request line to the empty line, empty lines before
#: it removed), for the ingress's hot path.
REQUEST_HEAD = re.compile(_TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]\r\n"
                          rb"(?:" + _TOKEN + rb":" + _TEXT + rb"*\r\n)*\r\n\Z")
#: A whole response head (status line to the empty line), for callers that
#: only need its syntax checked at C speed (the ingress's hot path).
RESPONSE_HEAD = re.compile(rb"HTTP/1\.[01] [1-9][0-9][0-9](?: " + _TEXT + rb"*)?\r\n"
                           rb"(?:" + _TOKEN + rb":" + _TEXT + rb"*\r\n)*\r\n\Z")


def request_line_ok(buf: bytes) -> bool:
    """False as soon as ``buf`` holds a whole first line that is no HTTP/1.x
    request line (HTTP/0.9, a bare LF, garbage), so that it is refused at once
    instead of held until a timeout; a line not yet whole passes."""
    nl = buf.find(b"\n")
    while nl == 1 and buf[0] == 13:  # empty lines before a request are allowed
        buf = buf[2:]
        nl = buf.find(b"\n")
    return nl < 0 or REQUEST_LINE.match(buf, 0, nl + 1) is not None


def head_end(buf: bytes) -> int:
    """Where the head in ``buf`` ends (after its empty line), or -1. A bare
    LF ends it too, so that such a head is refused now, not at a timeout.
    Empty lines before a request line are not a head (RFC 9112 2.2)."""
    start = 0
    while buf.startswith(b"\r\n", start):
        start += 2
    a = buf.find(b"\n\r\n", start)
    b = buf.find(b"\n\n", start)
    if a < 0:
        return b + 2 if b >= 0 else -1
    if 0 <= b < a:
        return b + 2
    return a + 3


def find_request_head(buf: bytes, max_head: int = LIMITS.max_head) -> int:
    """The end of the request head in ``buf``, or -1 while it is not whole;
    HeadError as soon as what is there cannot become a valid head (too
    large, or a first line that is no request line: answered now, not at a
    timeout). A whole head is checked further by whoever parses it."""
    end = head_end(buf)
    if 0 <= end <= max_head:
        return end
    if not request_line_ok(buf):
        raise HeadError("bad request line")
    if end >= 0 or len(buf) > max_head:
        raise HeadError("request head too large", 431)
    return -1


class Head:
    """Header fields as received (names keep their case), looked up without it."""

    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers

    def get(self, name: bytes) -> bytes | None:
        """The field's value; several fields of that name are joined with
        ", " (RFC 9110 5.3)."""
        name = name.lower()
        values = [v for n, v in self.headers if n.lower() == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else b", ".join(values)

    def tokens(self, name: bytes) -> set[bytes]:
        """A comma-separated list field (Connection, Upgrade) as lower-case tokens."""
        v = self.get(name)
        return set() if v is None else {t.strip().lower() for t in v.split(b",") if t.strip()}


class RequestHead(Head):
    __slots__ = ("method", "target", "version")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers) -> None:
        super().__init__(headers)
        self.method, self.target, self.version = method, target, version

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


class ResponseHead(Head):
    __slots__ = ("version", "status", "reason")

    def __init__(self, version: bytes, status: int, reason: bytes, headers) -> None:
        super().__init__(headers)
        self.version, self.status, self.reason = version, status, reason


def _lines(head: bytes, limits: HttpLimits, what: str) -> list[bytes]:
    if len(head) > limits.max_head:
        raise HeadError(f"{what} head too large", 431)
    if not head.endswith(b"\r\n\r\n"):
        raise HeadError(f"{what} head does not end with an empty line")
    return head[:-4].split(b"\r\n")


def _fields(lines: list[bytes], limits: HttpLimits) -> list[tuple[bytes, bytes]]:
    """The field lines, after the first line was found good."""
    if len(lines) > limits.max_headers:
        raise HeadError(f"more than {limits.max_headers} header fields", 431)
    out = []
    for line in lines:
        m = _FIELD.match(line)
        if m is None:
            raise HeadError("bad header line")  # obs-fold, a bare CR or LF, NUL, no name
        out.append((m.group(1), m.group(2)))
    return out


def parse_request_head(head: bytes, limits: HttpLimits = LIMITS) -> RequestHead:
    """A whole request head (request line to the empty line)."""
    while head.startswith(b"\r\n"):
        head = head[2:]
    lines = _lines(head, limits, "request")
    m = _REQUEST_LINE_PARTS.match(lines[0])
    if m is None:
        raise HeadError("bad request line")
    return RequestHead(m.group(1), m.group(2), b"1." + m.group(3), _fields(lines[1:], limits))


def parse_response_head(head: bytes, limits: HttpLimits = LIMITS) -> ResponseHead:
    """A whole response head (status line to the empty line)."""
    lines = _lines(head, limits, "response")
    m = _STATUS_LINE_PARTS.match(lines[0])
    if m is None:
        raise HeadError("bad status line")
    return ResponseHead(b"1." + m.group(1), int(m.group(2)), m.group(3) or b"", _fields(lines[1:], limits))


@dataclass(frozen=True)
class Reply:
    """A whole response one of the relay's own services gives (the front
    door writes it with ``response``, keeping the connection alive or not)."""

    status: int
    body: bytes = b""
    content_type: bytes = b"text/plain; charset=utf-8"
    headers: tuple = ()


def json_reply(status: int, doc, headers: tuple = ()) -> Reply:
    """A JSON answer of one of the relay's own APIs."""
    return Reply(status, orjson.dumps(doc), b"application/json", headers)


def error_reply(status: int, code: str, message: str, headers: tuple = ()) -> Reply:
    """The relay's APIs' error shape: ``{"error": code, "message": text}``."""
    return json_reply(status, {"error": code, "message": message}, headers)


def response(status: int, body: bytes = b"", content_type: bytes = b"text/plain; charset=utf-8",
             close: bool = True, headers: list[tuple[bytes, bytes]] | None = None, reason: bytes = b"") -> bytes:
    """A whole response relayd writes itself (errors, small local answers);
    ``reason``: a reason phrase of its own (CR, LF and other control
    characters are dropped from it)."""
    if reason:
        reason = bytes(c for c in reason[:300] if c == 9 or 32 <= c != 127)
    out = [b"HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, "Unknown").encode())]
    if status >= 200 and status not in (204, 304):
        out.append(b"Content-Type: " + content_type)
        out.append(b"Content-Length: %d" % len(body))
    for name, value in headers or ():
        out.append(name + b": " + value)
    if close:
        out.append(b"Connection: close")
    return b"\r\n".join(out) + b"\r\n\r\n" + body
