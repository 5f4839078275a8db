"""Log lines can be neither forged nor flooded: control characters are escaped in both
formats, and a repeated warning or error is written at most once a second with a count."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cp_token.runtime.clock import FakeClock
from cp_token.runtime.logs import (
    AUDIT_FIELDS,
    JsonFormatter,
    RepeatFilter,
    TextFormatter,
    audit,
    audit_json,
    escape_controls,
)

FORGED = "bob\n2026-01-01T00:00:00.000Z info    cp_token.audit: token_request issued"
HOSTILE = [FORGED, "eve\x1b[2K\x1b[1Gadmin", "nul\x00del\x7fc1\x85ls\u2028ps\u2029cr\r"]


@pytest.fixture
def stream() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("test.logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, out, handler
    logger.handlers[:] = []
    logger.propagate = True


def lines_of(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def log_hostile(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler],
    formatter: logging.Formatter,
    value: str,
) -> list[str]:
    """A warning and an audit line carrying ``value``; the output split on newlines."""
    logger, out, handler = stream
    handler.setFormatter(formatter)
    logger.warning("refused %s", value, extra={"fields": {"username": value}})
    audit_logger = logging.getLogger("cp_token.audit")
    audit_logger.addHandler(handler)
    level = audit_logger.level
    audit_logger.setLevel(logging.INFO)
    try:
        audit(
            outcome="denied",
            reason="pattern",
            username=value,
            namespace=value,
            pod=None,
            jti=None,
            latency_ms=1.0,
        )
    finally:
        audit_logger.removeHandler(handler)
        audit_logger.setLevel(level)
    lines = out.getvalue().split("\n")
    assert len(lines) == 3 and lines[2] == ""  # one line per record, whatever the value
    return lines[:2]


@pytest.mark.parametrize("value", HOSTILE)
def test_text_format_escapes_control_characters(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler], value: str
) -> None:
    for line in log_hostile(stream, TextFormatter(), value):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line), line
        assert "\u2028" not in line and "\u2029" not in line
        assert "\\" in line  # written as an escape, not dropped


@pytest.mark.parametrize("value", HOSTILE)
def test_json_format_escapes_control_characters(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler], value: str
) -> None:
    warning, audit_line = log_hostile(stream, JsonFormatter(), value)
    for line in (warning, audit_line):
        assert all(0x20 <= ord(c) < 0x7F for c in line)  # printable ASCII only
    record = json.loads(warning)
    assert record["username"] == value and record["msg"] == f"refused {value}"
    assert json.loads(audit_line)["username"] == value


def test_text_format_quotes_a_value_that_could_pass_for_more_fields(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, out, handler = stream
    handler.setFormatter(TextFormatter())
    logger.info("x", extra={"fields": {"username": "bob outcome=issued", "ns": "plain"}})
    assert lines_of(out)[0].endswith('username="bob outcome=issued" ns=plain')


def test_escape_controls_keeps_ordinary_text() -> None:
    assert escape_controls("plain tëxt / ok") == "plain tëxt / ok"
    assert escape_controls("a\nb\x1b") == "a\\x0ab\\x1b"


def test_a_repeated_error_passes_once_per_second_with_the_count() -> None:
    clock = FakeClock()
    repeat = RepeatFilter(clock=clock)

    def record(msg: str, level: int = logging.ERROR, name: str = "x") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, ("arg",), None)

    assert repeat.filter(record("accept failed: %s"))
    assert [repeat.filter(record("accept failed: %s")) for _ in range(999)] == [False] * 999
    assert repeat.filter(record("another %s"))  # another template
    assert repeat.filter(record("accept failed: %s", name="y"))  # another logger
    assert all(repeat.filter(record("served %s", logging.INFO)) for _ in range(5))
    clock.advance(0.99)
    assert not repeat.filter(record("accept failed: %s"))
    clock.advance(0.02)
    passed = record("accept failed: %s")
    assert repeat.filter(passed)
    assert passed.fields == {"suppressed": 1000}  # type: ignore[attr-defined]


def test_remembered_messages_are_bounded() -> None:
    clock = FakeClock()
    repeat = RepeatFilter(clock=clock, max_keys=10)
    for i in range(1000):
        repeat.filter(logging.LogRecord("x", logging.ERROR, __file__, 1, f"msg {i}", None, None))
    assert len(repeat._seen) == 10


async def test_asyncio_accept_out_of_resources_floods_nothing(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    """asyncio logs this once per pending connection when descriptors run out (about 26,000
    lines a second were seen): through the filter, once."""
    _, out, handler = stream
    handler.setFormatter(TextFormatter())
    handler.addFilter(RepeatFilter())
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(None)
    try:
        with socket.socket() as sock:
            for _ in range(2000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(24, "Too many open files"),
                        "socket": sock,
                    }
                )
    finally:
        asyncio_logger.removeHandler(handler)
    lines = lines_of(out)
    assert len(lines) == 1, lines[:3]
    assert "socket.accept() out of system resource" in lines[0]


TEXT = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["\x7f", "é", "\u2028", '"\\']))


@given(
    event=st.sampled_from(["token_request", "token_exchange"]),
    outcome=TEXT,
    reason=TEXT,
    username=TEXT,
    namespace=TEXT,
    pod=TEXT,
    jti=TEXT,
    latency=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers()),
    created=st.floats(min_value=0, max_value=4e9),
)
def test_the_direct_audit_line_is_json_dumps_text(**values: Any) -> None:
    created = values.pop("created")
    fields = dict(zip(AUDIT_FIELDS[1:-1], list(values.values())[:-1], strict=True))
    fields["latency_ms"] = values["latency"]
    line = audit_json(created, fields)
    ts = json.loads(line)["ts"]
    expected = json.dumps({"ts": ts, **fields}, separators=(",", ":")).replace("\x7f", "\\u007f")
    assert line == expected
    assert all(0x20 <= ord(c) < 0x7F for c in line)


def test_the_audit_record_goes_through_the_logger_and_its_handlers() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("cp_token.audit")
    level = logger.level
    logger.addHandler(handler)
    try:
        logger.setLevel(logging.WARNING)  # below the logger's level: nothing written
        audit(
            outcome="issued",
            reason="ok",
            username="u",
            namespace=None,
            pod=None,
            jti=None,
            latency_ms=1.0,
        )
        assert out.getvalue() == ""
        logger.setLevel(logging.INFO)
        audit(
            outcome="issued",
            reason="ok",
            username="u",
            namespace="n",
            pod="p",
            jti="j",
            latency_ms=1.23456,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    line = json.loads(out.getvalue())
    assert list(line) == list(AUDIT_FIELDS) and line["latency_ms"] == 1.235


def test_text_audit_line_carries_every_schema_field(
    stream: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    # SPEC: "the audit line has a fixed schema: ts, event, outcome, reason, username,
    # namespace, pod, jti, latency_ms" in either format; a refusal before authentication
    # has no username, pod or jti, and the text line still names them.
    _, out, handler = stream
    handler.setFormatter(TextFormatter())
    audit_logger = logging.getLogger("cp_token.audit")
    audit_logger.addHandler(handler)
    level = audit_logger.level
    audit_logger.setLevel(logging.INFO)
    try:
        audit(
            outcome="invalid_token",
            reason="missing",
            username=None,
            namespace=None,
            pod=None,
            jti=None,
            latency_ms=0.5,
        )
    finally:
        audit_logger.removeHandler(handler)
        audit_logger.setLevel(level)
    (line,) = lines_of(out)
    pairs = [word.split("=", 1) for word in line.split() if "=" in word]
    assert [key for key, _ in pairs] == list(AUDIT_FIELDS)
    values = dict(pairs)
    assert values["event"] == "token_request" and values["outcome"] == "invalid_token"
    assert values["username"] == values["pod"] == values["jti"] == "-"
    assert values["latency_ms"] == "0.5" and values["ts"] == line.split()[0]
