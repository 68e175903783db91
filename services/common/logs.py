"""Structured logs: one JSON object per line, and a sampled access log.

Records carry only bounded, non-secret facts: never payloads, tensors, headers or keys. The
optional per-request fields (`request_id`, `trace_id`, `model`, `version`, `status`,
`latency_ms`, and `dropped` on the line that counts access-log lines left out) appear when a
call passes them in `extra=`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import time
from collections.abc import Callable

#: Fields copied from a record when present (set through `extra=`).
EXTRA_FIELDS = ("request_id", "trace_id", "model", "version", "status", "latency_ms",
                "dropped")

ACCESS_LOGGER = "meshserve.access"
#: Successes are sampled (a line costs more CPU than the rest of a request's logging, and
#: high-volume proxies sample by default); failures are always logged.
DEFAULT_ACCESS_LOG_SAMPLE = 0.01
#: Access-log lines written in any one second, at most: failures are all logged, so a flood of
#: them would otherwise write as fast as they are refused.
DEFAULT_ACCESS_LOG_MAX_PER_SECOND = 100
#: Where access-log lines go (a logger of its own, so it can be silenced or routed apart).
ACCESS_LOG = logging.getLogger(ACCESS_LOGGER)


class JsonFormatter(logging.Formatter):
    """`{"timestamp", "level", "service", "logger", "message", ...}` on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EXTRA_FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                entry[field] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


def text_formatter(service: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def formatter(service: str, fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(service)
    if fmt == "text":
        return text_formatter(service)
    raise ValueError(f"log format {fmt!r} is not json or text")


class LinesPerSecond:
    """At most `limit` lines in any one second of `clock` (0: no limit). `admit()` says
    whether a line may be written; `dropped` counts the lines refused since it was last
    reset."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.dropped = 0
        self._clock = clock
        self._second = -1
        self._written = 0

    def admit(self) -> bool:
        if self.limit <= 0:
            return True
        second = int(self._clock())
        if second != self._second:
            self._second, self._written = second, 0
        if self._written >= self.limit:
            self.dropped += 1
            return False
        self._written += 1
        return True


def access_log(logger: logging.Logger, *, request_id: str, trace_id: str, model: str,
               version: str, status: str, latency_ms: float, sample: float = 1.0,
               rand: Callable[[], float] = random.random,
               lines: LinesPerSecond | None = None) -> None:
    """One access-log line per answered request: always for a failure, with probability
    `sample` (0..1) for a success; within `lines`' limit, when given. The first line written
    after some were left out is preceded by one that counts them (`dropped`).

    Only identifiers and outcome travel: never inputs, outputs or credentials.
    """
    if status == "OK" and (sample <= 0.0 or (sample < 1.0 and rand() >= sample)):
        return
    if not logger.isEnabledFor(logging.INFO):
        return
    if lines is not None:
        if not lines.admit():
            return
        if lines.dropped:
            logger.warning("%d access-log lines left out: more than %d a second",
                           lines.dropped, lines.limit, extra={"dropped": lines.dropped})
            lines.dropped = 0
    logger.info("%s %s/%s %s %.3f ms", request_id, model, version, status, latency_ms,
                extra={"request_id": request_id, "trace_id": trace_id or None,
                       "model": model, "version": version, "status": status,
                       "latency_ms": round(latency_ms, 3)})


def lines_limit(text: str) -> int:
    """argparse type for `--access-log-max-per-second`: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is below 0")
    return value


def sample_fraction(text: str) -> float:
    """argparse type for `--access-log-sample`: a float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value
