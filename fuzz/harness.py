"""What every fuzz harness shares: the input format, the builds, the oracle.

Input format
------------
A harness gets one byte string from the fuzzer and reads it as a small
script, so that the bytes the parser sees stay contiguous (the mutator works
on real frames and requests) while the fuzzer still chooses how they are cut
into reads and which local commands run between them::

    byte 0        mode: harness options (role, limits, which canned request ...)
    byte 1        k: how many step bytes follow (low 6 bits: at most 63)
    bytes 2..2+k  steps: one byte each, low nibble = size of the next read
                  (an index into CHUNK_SIZES), high nibble = the command
                  run after that read (0 = none; the table is the harness's)
    the rest      the wire bytes, fed in the reads the steps cut; what the
                  steps leave goes in one last read

``Script`` decodes it; ``encode_script`` (used by fuzz/make_corpus.py)
builds it.

Builds
------
Each hot module has a compiled build and its pure twin (one source). The
harnesses run every input through each build and require identical
transcripts: the pure twin is instrumented by atheris and guides coverage,
the compiled build is the oracle. With ``RELAYD_NO_EXTENSIONS=1`` only the
pure twin is run (``builds`` says so on stderr once), and the invariants are
the only oracle.

Anything that escapes a parser, any disagreement between builds and any
broken invariant raises ``Finding``: atheris then stores the input as a
crash artifact and stops.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys

from relayd._build import HOT_MODULES, extensions_disabled
from relayd.errors import StreamError, StreamResetError

#: Read sizes a step can ask for (low nibble). Small sizes split headers at
#: every byte; the last entry means "everything left".
CHUNK_SIZES = (0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 16, 100, 1000, 1 << 30)
#: Steps per input at most: every step costs a parser call and a command in
#: each build, and a few dozen reach every state worth reaching.
MAX_STEPS = 63


class Finding(AssertionError):
    """A bug found by a harness: an escaped exception, a divergence between
    builds, or a broken invariant."""


# --- input format -------------------------------------------------------------------


class Script:
    """One fuzzer input, decoded (see the module docstring)."""

    __slots__ = ("mode", "steps", "wire")

    def __init__(self, data: bytes) -> None:
        self.mode = data[0] if data else 0
        k = data[1] & MAX_STEPS if len(data) > 1 else 0
        self.steps = data[2 : 2 + k]
        self.wire = data[2 + k :]

    def reads(self):
        """``(index, chunk, command)`` for each step, then the rest of the
        wire bytes (command 0). Steps past the end give empty reads, so
        their commands still run."""
        wire = self.wire
        pos = 0
        for i, b in enumerate(self.steps):
            n = CHUNK_SIZES[b & 15]
            yield i, wire[pos : pos + n], b >> 4
            pos += n
        if pos < len(wire):
            yield len(self.steps), wire[pos:], 0


def step(size: int, command: int = 0) -> int:
    """The step byte for a read of ``size`` bytes (one of CHUNK_SIZES)
    followed by ``command``."""
    return (command << 4) | CHUNK_SIZES.index(size)


def encode_script(mode: int, steps, wire: bytes) -> bytes:
    steps = bytes(steps)
    if len(steps) > MAX_STEPS:
        raise ValueError(f"at most {MAX_STEPS} steps")
    return bytes((mode, len(steps))) + steps + wire


def script_of(mode: int, pieces) -> bytes:
    """The input that feeds each ``(data, command)`` of ``pieces`` (reads
    of whatever sizes add up to ``data``), running ``command`` after it."""
    steps = []
    for data, command in pieces:
        left = len(data)
        while True:
            size = max(s for s in CHUNK_SIZES if s <= left)
            left -= size
            if not left:
                steps.append(step(size, command))
                break
            steps.append(step(size))
    return encode_script(mode, steps, b"".join(data for data, _ in pieces))


# --- builds and instrumentation --------------------------------------------------------


def instrumented(enabled: bool):
    """Context manager for importing the modules under test: atheris
    instruments the pure relayd sources imported inside it when ``enabled``
    (the harness runs as the fuzzer, not from a test)."""
    if not enabled:
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["relayd"])


_announced = set()


def builds(name: str) -> list:
    """``[(label, module)]`` of hot module ``name`` ("yamux", "wsframe",
    "h1proxy"): the compiled build and the pure twin, or the pure twin alone
    under RELAYD_NO_EXTENSIONS=1."""
    base = HOT_MODULES[name]
    pure = ("pure", importlib.import_module(base + "_py"))
    if extensions_disabled():
        if name not in _announced:
            _announced.add(name)
            print(f"fuzz: RELAYD_NO_EXTENSIONS=1: {base}_py alone, no compiled oracle", file=sys.stderr)
        return [pure]
    return [("compiled", importlib.import_module(base + "_c")), pure]


def each_build(name: str, run, *args) -> list:
    """``[(label, run(module, *args))]`` for every build; an exception out of
    ``run`` (which drives a parser and records what it did) is a finding."""
    out = []
    for label, mod in builds(name):
        try:
            out.append((label, run(mod, *args)))
        except Finding as exc:
            raise Finding(f"{label} build: {exc}") from exc
        except Exception as exc:
            raise Finding(f"{label} build: {type(exc).__name__} escaped: {exc}") from exc
    return out


def agree(results: list) -> None:
    """All builds' transcripts (lists) must be equal; says where they part."""
    (la, a), *rest = results
    for lb, b in rest:
        if a == b:
            continue
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        x = a[i] if i < len(a) else "<end>"
        y = b[i] if i < len(b) else "<end>"
        raise Finding(f"builds disagree at entry {i}:\n  {la}: {_short(x)}\n  {lb}: {_short(y)}")


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 400 else r[:400] + "..."


def describe(ev) -> tuple:
    """A build-independent description of a core event (yamux or WebSocket)."""
    t = type(ev)
    fields = _fields.get(t)
    if fields is None:
        fields = _fields[t] = tuple(f for f in _EVENT_FIELDS if hasattr(ev, f))
    out = [t.__name__]
    for f in fields:
        v = getattr(ev, f)
        out.append((type(v).__name__, str(v)) if f == "error" else v)
    return tuple(out)


_EVENT_FIELDS = ("stream_id", "opcode", "data", "fin", "delta", "opaque", "code", "reason", "error", "close_code")
_fields: dict = {}  # event type -> its fields among _EVENT_FIELDS


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Finding(what)


def check_events(evs: list, names, error_name: str, failed_before: bool, failed_now: bool):
    """The event contract of the sans-I/O cores: known event types only; a
    failed parser makes no more events; the error event comes last, exactly
    when the parser fails. Returns the error event, or None."""
    if failed_before:
        check(not evs, f"a failed parser still made events: {evs!r:.200}")
        return None
    err = None
    for k, e in enumerate(evs):
        name = type(e).__name__
        check(name in names, f"unknown event {name}")
        if name == error_name:
            check(k == len(evs) - 1, f"events after a {error_name}")
            err = e
    check((err is not None) == failed_now, f"a {error_name} {'without' if failed_now else 'but'} failing")
    return err


# --- an event loop for the ingress --------------------------------------------------------

_loop = None


def run_in_loop(coro):
    """Run ``coro`` on the one uvloop loop of this process (created once)."""
    global _loop
    if _loop is None:
        import uvloop

        _loop = uvloop.new_event_loop()
    return _loop.run_until_complete(coro)


class _ErrorLog(logging.Handler):
    """Collects the ERROR records of relayd's loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list = []
        logging.getLogger("relayd").addHandler(self)

    def emit(self, record) -> None:
        self.records.append(record)


_errors = None
_internal_seen = 0.0


def _internal_errors() -> float:
    """relayd_internal_errors_total, all labels: exceptions relayd caught at
    a boundary none may cross (its log line is rate-limited, the count not)."""
    from relayd import metrics

    counter = getattr(metrics, "INTERNAL_ERRORS", None)
    if counter is None:
        return 0.0
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def watch_errors() -> None:
    """Start watching for relayd's own errors (see check_no_error_logged)."""
    global _errors, _internal_seen
    if _errors is None:
        _errors = _ErrorLog()
    _errors.records = []
    _internal_seen = _internal_errors()


def check_no_error_logged() -> None:
    """A finding if, since watch_errors(), relayd logged an error or counted
    an exception of its own (a handler or callback that raised: a bug, even
    where relayd contains it)."""
    new = _internal_errors() - _internal_seen
    out, _errors.records = _errors.records, []
    lines = [f"{r.name}: {r.getMessage()} ({r.exc_info[0].__name__ if r.exc_info else 'no exception'})"
             for r in out]
    if new:
        lines.append(f"relayd_internal_errors_total grew by {new:g}")
    check(not lines, "relayd reported an error of its own: " + "; ".join(lines))


# --- running under atheris -----------------------------------------------------------------


def main(test_one_input) -> None:
    """Fuzz ``test_one_input`` with the libFuzzer arguments on the command
    line. Crash inputs go to fuzz/artifacts/<harness>/ (ignored by git)
    unless -artifact_prefix says otherwise."""
    import atheris

    if not any(a.startswith("-artifact_prefix=") for a in sys.argv[1:]):
        name = os.path.basename(sys.argv[0]).removeprefix("fuzz_").removesuffix(".py")
        art = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts", name)
        os.makedirs(art, exist_ok=True)
        sys.argv.append(f"-artifact_prefix={art}/")

    # relayd's log lines about bad input would flood the fuzzer's output;
    # errors are still collected (check_no_error_logged).
    logging.getLogger("relayd").propagate = False
    watch_errors()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


# --- the HTTP ingress with fake ends ------------------------------------------------------
#
# The ingress (relayd/net/http_ingress.py, over the framing machine of
# relayd/core/_h1proxy_py.py in one build or the other) talks to a client
# transport and to yamux streams toward the service. Both are faked here with the behaviour of
# the real ones that the ingress can see (MuxStream: a stream reset either
# way refuses sends, a half-closed one too; data on a stream the relay reset
# is dropped), and every call either way is written to one transcript.

#: Bugs of the ingress the harnesses found, reported with a reproducer in
#: tests/fuzz/test_findings.py (xfail until fixed), and tolerated here, each
#: as narrowly as it allows, so that the fuzzer looks further and the short
#: run of CI stays green. Remove an entry with the fix of its bug.
KNOWN: set = set()  # none left: the findings were fixed (tests/fuzz/test_findings.py)

#: Routes of the fake relay: several endpoints, so requests can move a
#: connection from one stream to another.
ROUTES = (("web", "app.example"), ("api", "app.example/api"), ("v6", "[::1]"), ("alt", "alt.example"))

#: Requests a client sends (fuzz_http_response's mode and commands pick them).
REQUESTS = (
    b"GET / HTTP/1.1\r\nHost: app.example\r\n\r\n",
    b"HEAD /api/x HTTP/1.1\r\nHost: app.example\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: app.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /old HTTP/1.0\r\nHost: alt.example\r\n\r\n",
    b"GET /bye HTTP/1.1\r\nHost: [::1]:8443\r\nConnection: close\r\n\r\n",
    b"PUT /api/put HTTP/1.1\r\nHost: app.example\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
)

#: Responses a service sends (fuzz_http_request's commands pick them).
RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
)


class FakeTransport:
    """The client's transport."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.reading = True
        self.closing = False

    def get_extra_info(self, key, default=None):
        return ("127.0.0.1", 1) if key == "peername" else default

    def write(self, data) -> None:
        self.log.append(("client <-", bytes(data)))

    def close(self) -> None:
        self.closing = True
        self.log.append(("close",))

    def abort(self) -> None:
        self.closing = True
        self.log.append(("abort",))

    def pause_reading(self) -> None:
        self.reading = False
        self.log.append(("pause_reading",))

    def resume_reading(self) -> None:
        self.reading = True
        self.log.append(("resume_reading",))

    def is_closing(self) -> bool:
        return self.closing

    def set_protocol(self, protocol) -> None:
        self.log.append(("set_protocol", type(protocol).__name__))


class FakeStream:
    """A yamux stream to the service, as the ingress sees a MuxStream."""

    def __init__(self, sid: int, log: list, window: int) -> None:
        self.sid = sid
        self.log = log
        self.window = window
        self.sink = None
        self.reset_by_relay = False
        self.reset_by_service = False
        self.eof_from_relay = False
        self.eof_from_service = False
        self.delivered = 0  # bytes handed to the sink
        self.credited = 0  # bytes the sink said it consumed
        self.sent = bytearray()  # what the service received

    @property
    def at_eof(self) -> bool:
        return self.eof_from_service or self.reset_by_service or self.reset_by_relay

    def attach(self, sink) -> None:
        self.sink = sink
        self.log.append(("attach", self.sid, type(sink).__name__))

    def send_nowait(self, data) -> int:
        if self.reset_by_relay or self.reset_by_service:
            raise StreamResetError(f"stream {self.sid} was reset")
        if self.eof_from_relay:
            raise StreamError(f"stream {self.sid} is local-closed: cannot send")
        n = min(len(data), self.window)
        self.window -= n
        self.sent += data[:n]
        self.log.append(("service <-", self.sid, bytes(data[:n])))
        return n

    def consumed(self, n: int) -> None:
        self.credited += n
        self.log.append(("consumed", self.sid, n))

    def write_eof(self) -> None:
        self.eof_from_relay = True
        self.log.append(("write_eof", self.sid))

    def reset(self) -> None:
        self.reset_by_relay = True
        self.log.append(("reset", self.sid))


class Ingress:
    """One ``HttpConnection`` over one build's framing between a fake client and fake
    streams. Create it inside the event loop (``run_in_loop``).

    Mode bits 0-1 say what opening a stream gives: always a stream; never
    (no agent, 503); a stream, then False (agent busy); a stream, then None.
    Bit 2: a stream's send window is 10 bytes, grown by ``grant``.

    The client's bytes and EOF reach the connection as a transport would
    deliver them: not while reading is paused (they wait), never after the
    transport was closed or after EOF.
    """

    def __init__(self, mod, mode: int) -> None:
        self.log: list = []
        self.streams: list = []
        self.held = b""  # client bytes waiting for reading to resume
        self.eof_held = False
        self.eof_done = False
        self.opener = mode & 3
        self.window = 10 if mode & 4 else 1 << 40
        # A module-wide cache of rewritten response heads: cleared, so that
        # an input replays the same way alone or after others.
        mod.clear_head_cache()
        from relayd.net import http_ingress

        self.transport = FakeTransport(self.log)
        self.conn = http_ingress.HttpConnection(None, self.transport,
                                                [http_ingress.parse_route(n, t) for n, t in ROUTES],
                                                self._open, 30.0, framing=mod.Framing)

    def _open(self, endpoint: str, client: str, ready) -> None:
        """The stream seam's part: answers ready(stream, None) or ready(None, reason)."""
        self.log.append(("open", endpoint, client))
        if self.opener == 1 or (self.opener >= 2 and self.streams):
            ready(None, "no_agent" if self.opener != 2 else "agent_busy")
            return
        st = FakeStream(len(self.streams), self.log, self.window)
        self.streams.append(st)
        ready(st, None)

    def _live(self):
        """The newest stream, if the service can still send on it."""
        st = self.streams[-1] if self.streams else None
        if st is None or st.sink is None or st.reset_by_relay or st.reset_by_service or st.eof_from_service:
            return None
        return st

    def _orphan_body(self) -> bool:
        """The request still receiving its body was already answered."""
        fr = self.conn.framing
        cur = fr.cur
        return cur is not None and not cur.complete and cur is not fr.active and cur not in fr.queue

    def state(self) -> tuple:
        c = self.conn
        fr = c.framing
        return ("state", c.closed, fr.client_state, fr.service_state, fr.resp_started, fr.body_left, fr.resp_left,
                len(fr.queue), fr.queued_bytes, c.reading_paused, c.write_paused)

    # what the client does
    def client(self, data: bytes) -> None:
        self.held += data
        self.deliver()

    def client_eof(self) -> None:
        self.eof_held = True
        self.deliver()

    def deliver(self) -> None:
        """Hand the client's waiting bytes, then its EOF, to the connection
        if the transport reads."""
        t = self.transport
        if "body-after-early-response" in KNOWN and self._orphan_body():
            self.held = b""  # (see KNOWN)
        if self.held and t.reading and not t.closing and not self.eof_done:
            data, self.held = self.held, b""
            self.conn.feed(data)
        if self.eof_held and not self.held and t.reading and not t.closing and not self.eof_done:
            self.eof_done = True
            self.conn.eof()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    # what the service (through the agent) does
    def service(self, data: bytes) -> None:
        st = self._live()
        if st is not None and data:
            st.delivered += len(data)
            st.sink.stream_data(data)

    def service_eof(self) -> None:
        st = self._live()
        if st is not None:
            st.eof_from_service = True
            st.sink.stream_eof()

    def service_reset(self) -> None:
        st = self._live()
        if st is not None:
            st.reset_by_service = True
            st.sink.stream_reset()

    def grant(self) -> None:
        st = self._live()
        if st is not None:
            st.window += 256
            st.sink.stream_window()

    # the clock
    def expire(self) -> None:
        if self.conn.deadline:
            self.conn.expire()

    def finish(self) -> list:
        """The client goes away; the transcript."""
        self.conn.lost()
        self.log.append(self.state())
        for st in self.streams:
            if "deferred-credit-other-stream" not in KNOWN:
                check(st.credited <= st.delivered,
                      f"stream {st.sid}: {st.credited} bytes credited back of {st.delivered} received")
            _check_upstream(st)
        credited = sum(st.credited for st in self.streams)
        delivered = sum(st.delivered for st in self.streams)
        check(credited <= delivered, f"{credited} bytes credited back of {delivered} received")
        return self.log


class _Heads:
    """httptools callbacks: the header fields of each whole request head."""

    def __init__(self) -> None:
        self.heads: list = []
        self.fields: list = []

    def on_message_begin(self) -> None:
        self.fields = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.heads.append(self.fields)


def _check_upstream(st: FakeStream) -> None:
    """What a service reads on the stream, parsed as it would (llhttp, up to
    an upgrade), is well-formed HTTP/1.1, and each request in it is one the
    relay wrote: it carries the forwarding fields the relay adds (and drops
    from clients). A request without them came from inside a client's body
    or a confused splice: smuggled past the relay's routing."""
    import httptools

    found = _Heads()
    parser = httptools.HttpRequestParser(found)
    if "http10-keep-alive-reuse" in KNOWN:
        parser.set_dangerous_leniencies(lenient_keep_alive=True)
    try:
        parser.feed_data(bytes(st.sent))
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise Finding(f"stream {st.sid}: the service got bytes that are not HTTP/1.1 ({exc}): "
                      f"{_short(bytes(st.sent))}") from None
    for fields in found.heads:
        check((b"x-forwarded-proto", b"https") in fields
              and any(n == b"forwarded" and v.startswith(b"for=127.0.0.1;proto=https;host=") for n, v in fields),
              f"stream {st.sid}: the service got a request the relay did not write: {_short(bytes(st.sent))}")



def drive_ingress(mod, script: Script, reads_go_to: str, commands: tuple, opening: bytes = b"") -> list:
    """One input through one build's ingress: ``opening`` from the client,
    then each read to ``reads_go_to`` ("client" or "service"), each followed
    by its command: ``commands[n]`` is None or ``(Ingress method name,
    *args)``. Returns the transcript; relayd logging an error of its own (a
    handler or callback that raised) is a finding."""
    async def run() -> list:
        ing = Ingress(mod, script.mode)
        if opening:
            ing.client(opening)
            ing.log.append(ing.state())
        to = getattr(ing, reads_go_to)
        for _, chunk, cmd in script.reads():
            to(chunk)
            action = commands[cmd]
            if action is not None:
                getattr(ing, action[0])(*action[1:])
            ing.deliver()
            ing.log.append(ing.state())
        return ing.finish()

    watch_errors()
    out = run_in_loop(run())
    check_no_error_logged()
    return out
