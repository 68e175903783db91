"""Structured logs: the JSON-lines formatter and the sampled access log."""

import argparse
import datetime
import io
import json
import logging

import pytest

from meshserve.common import runtime
from meshserve.common.logs import (
    JsonFormatter,
    LinesPerSecond,
    access_log,
    formatter,
    lines_limit,
    sample_fraction,
)


def capture(name: str, fmt: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_formatter_emits_one_json_object_with_the_fields():
    logger, stream = capture("test.logs.plain", JsonFormatter("router"))
    logger.warning("upstream %s is slow", "batcher")
    [entry] = lines(stream)
    assert entry["level"] == "WARNING"
    assert entry["service"] == "router"
    assert entry["logger"] == "test.logs.plain"
    assert entry["message"] == "upstream batcher is slow"
    stamp = datetime.datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert entry["timestamp"].endswith("Z")
    assert not {"request_id", "trace_id", "model", "version", "status", "latency_ms"} & set(entry)


def test_extra_fields_appear():
    logger, stream = capture("test.logs.extra", JsonFormatter("ingress"))
    logger.info("done", extra={"request_id": "ab-1", "trace_id": "0af7", "model": "mlp",
                               "version": "2", "status": "OK", "latency_ms": 3.5,
                               "unrelated": "not copied"})
    [entry] = lines(stream)
    assert {k: entry[k] for k in ("request_id", "trace_id", "model", "version", "status",
                                  "latency_ms")} == {
        "request_id": "ab-1", "trace_id": "0af7", "model": "mlp", "version": "2",
        "status": "OK", "latency_ms": 3.5}
    assert "unrelated" not in entry


def test_exceptions_stay_on_one_line():
    logger, stream = capture("test.logs.exc", JsonFormatter("compute"))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("batch failed")
    [entry] = lines(stream)
    assert "RuntimeError: boom" in entry["exception"]
    assert len(stream.getvalue().splitlines()) == 1


def test_text_format_is_still_available():
    logger, stream = capture("test.logs.text", formatter("batcher", "text"))
    logger.info("hello")
    assert " batcher INFO test.logs.text: hello" in stream.getvalue()
    with pytest.raises(ValueError):
        formatter("batcher", "xml")


def send(sample: float, n: int = 50, status: str = "OK", **kwargs) -> list[dict]:
    logger, stream = capture(f"test.logs.access.{sample}.{status}", JsonFormatter("ingress"))
    for i in range(n):
        access_log(logger, request_id=f"r-{i}", trace_id="t", model="mlp", version="1",
                   status=status, latency_ms=1.25, sample=sample, **kwargs)
    return lines(stream)


def test_access_log_sample_one_logs_everything():
    entries = send(1.0)
    assert [e["request_id"] for e in entries] == [f"r-{i}" for i in range(50)]
    assert entries[0]["latency_ms"] == 1.25
    assert entries[0]["status"] == "OK"
    assert entries[0]["model"] == "mlp" and entries[0]["version"] == "1"


def test_access_log_sample_zero_logs_no_success_and_every_failure():
    assert send(0.0) == []
    assert len(send(0.0, n=7, status="UNAVAILABLE")) == 7


def test_access_log_samples_a_fraction():
    draws = iter([0.1, 0.9] * 25)
    assert len(send(0.5, rand=lambda: next(draws))) == 25


def test_a_flood_of_failures_writes_at_most_the_limit_a_second_and_counts_the_rest():
    now = [100.2]
    limit = LinesPerSecond(3, clock=lambda: now[0])
    entries = send(1.0, n=10, status="UNAVAILABLE", lines=limit)
    assert [e["request_id"] for e in entries] == ["r-0", "r-1", "r-2"]
    now[0] = 101.0  # the next second: its first line is preceded by the count left out
    entries = send(1.0, n=4, status="UNAVAILABLE", lines=limit)
    assert entries[0]["level"] == "WARNING" and entries[0]["dropped"] == 7
    assert entries[0]["message"] == "7 access-log lines left out: more than 3 a second"
    assert [e["request_id"] for e in entries[1:]] == ["r-0", "r-1", "r-2"]
    assert limit.dropped == 1
    now[0] = 105.5  # a quiet second later: one count line, then every line again
    entries = send(1.0, n=2, status="OK", lines=limit)
    assert [e.get("dropped") for e in entries] == [1, None, None]


def test_a_limit_of_zero_writes_every_line():
    limit = LinesPerSecond(0, clock=lambda: 7.0)
    assert len(send(1.0, n=500, status="INTERNAL", lines=limit)) == 500
    assert limit.dropped == 0


def test_unsampled_successes_take_none_of_the_limit():
    limit = LinesPerSecond(2, clock=lambda: 7.0)
    assert send(0.0, n=50, lines=limit) == []
    assert len(send(0.0, n=2, status="INTERNAL", lines=limit)) == 2


def test_access_log_omits_an_empty_trace_id():
    logger, stream = capture("test.logs.access.trace", JsonFormatter("ingress"))
    access_log(logger, request_id="r", trace_id="", model="m", version="1", status="OK",
               latency_ms=1)
    [entry] = lines(stream)
    assert "trace_id" not in entry


def test_sample_flag_is_bounded():
    assert sample_fraction("0.25") == 0.25
    for bad in ("-0.1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            sample_fraction(bad)
    assert lines_limit("0") == 0 and lines_limit("250") == 250
    for bad in ("-1", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            lines_limit(bad)


def test_server_flags_default_to_json_and_sampled_successes():
    parser = argparse.ArgumentParser()
    runtime.add_server_flags(parser)
    args = parser.parse_args(["--tls-cert=c", "--tls-key=k", "--tls-ca=a"])
    assert (args.log_format, args.access_log_sample) == ("json", 0.01)
    assert args.access_log_max_per_second == 100
    args = parser.parse_args(["--tls-cert=c", "--tls-key=k", "--tls-ca=a", "--log-format=text",
                              "--access-log-sample=0.1"])
    assert (args.log_format, args.access_log_sample) == ("text", 0.1)


def test_configure_logging_installs_the_formatter(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # pytest's own handlers stay untouched
    monkeypatch.setattr(root, "level", root.level)
    runtime.configure_logging("router", "debug", "json")
    [handler] = root.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert root.level == logging.DEBUG
    runtime.configure_logging("router", "info", "text")
    [handler] = root.handlers
    assert not isinstance(handler.formatter, JsonFormatter)
    assert root.level == logging.INFO
