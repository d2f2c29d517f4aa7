"""Structured JSON logs (orjson): one object per line, metadata only.

Payload bytes, secrets and tokens never reach a log call in relayd; this
formatter also drops any ``extra`` field whose name suggests a secret, as a
second line of defence.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref

import orjson

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
_SECRETISH = ("secret", "token", "password", "key", "payload", "data")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k in _STANDARD or k.startswith("_") or any(s in k.lower() for s in _SECRETISH):
                continue
            out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = record.exc_info[0].__name__
            out["exc_msg"] = str(record.exc_info[1])
        return orjson.dumps(out).decode()


def setup(level: str = "info", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


_RATE_LIMITED: "weakref.WeakSet[RateLimitedLog]" = weakref.WeakSet()


def reset_rate_limits() -> None:
    """Open a new window for every rate-limited logger (each test starts
    with its own budget of lines)."""
    for rl in list(_RATE_LIMITED):
        rl._windows.clear()


class RateLimitedLog:
    """A logger for refusals an attacker can trigger at will: at most
    ``burst`` lines per ``interval`` seconds for each message template (the
    format string, not its arguments); the lines held back are counted and
    reported as ``suppressed`` on the next line that gets through. Metrics
    count every refusal; the log only has to show that they happen."""

    __slots__ = ("logger", "interval", "burst", "_windows", "__weakref__")

    def __init__(self, logger: logging.Logger, interval: float = 10.0, burst: int = 5) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self._windows: dict[str, list] = {}  # template -> [window start, lines in it, suppressed]
        _RATE_LIMITED.add(self)

    def log(self, level: int, msg: str, *args, extra: dict | None = None) -> bool:
        """Log unless this template is over its budget; True if logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        w = self._windows.get(msg)
        if w is None:
            if len(self._windows) > 1024:  # templates are code constants; never grows in practice
                self._windows.clear()
            w = self._windows[msg] = [now, 0, 0]
        elif now - w[0] >= self.interval:
            w[0], w[1] = now, 0
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        if w[2]:
            extra = dict(extra or {}, suppressed=w[2])
            w[2] = 0
        self.logger.log(level, msg, *args, extra=extra)
        return True

    def info(self, msg: str, *args, extra: dict | None = None) -> bool:
        return self.log(logging.INFO, msg, *args, extra=extra)

    def warning(self, msg: str, *args, extra: dict | None = None) -> bool:
        return self.log(logging.WARNING, msg, *args, extra=extra)

    def error(self, msg: str, *args, extra: dict | None = None) -> bool:
        return self.log(logging.ERROR, msg, *args, extra=extra)


_CAUGHT_LOG = RateLimitedLog(logging.getLogger("relayd.internal"))


def caught(where: str, exc: BaseException, **extra) -> None:
    """Count and log an exception caught at a boundary none may cross (a
    relayd bug, contained to one stream or exchange). The line names the
    code location, never the exception's text: that may quote payload."""
    from relayd import metrics

    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    at = f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb is not None else "?"
    metrics.INTERNAL_ERRORS.labels(where).inc()
    _CAUGHT_LOG.error("caught %s at %s (%s)", type(exc).__name__, at, where, extra=extra)
