"""Logging: one JSON object per line (or text for humans), and the audit line.

Nothing here ever receives a token; callers pass hashes or nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import OrderedDict
from json.encoder import encode_basestring_ascii
from typing import Any

from cp_token.runtime.clock import Clock, SystemClock, rfc3339

__all__ = [
    "AUDIT_FIELDS",
    "JsonFormatter",
    "RepeatFilter",
    "TextFormatter",
    "audit",
    "escape_controls",
    "setup_logging",
]

AUDIT_FIELDS = (
    "ts",
    "event",
    "outcome",
    "reason",
    "username",
    "namespace",
    "pod",
    "jti",
    "latency_ms",
)
_AUDIT_KEYS = AUDIT_FIELDS[1:]

audit_logger = logging.getLogger("cp_token.audit")

# C0, DEL, C1, and the Unicode line/paragraph separators some viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x1b``), so
    input (a username, a description) can never start a new log line or drive a terminal."""
    return _CONTROL.sub(_escape_one, text) if _CONTROL.search(text) else text


class RepeatFilter(logging.Filter):
    """Lets a repeated warning or error through at most once per ``interval`` seconds.

    Records are the same when their logger and message template (``record.msg``, before
    arguments) are; the next one let through carries ``suppressed``: how many were dropped
    since. Info and below (the audit line among them) always pass. At most ``max_keys``
    distinct messages are remembered (the oldest are forgotten first).
    """

    def __init__(
        self, interval: float = 1.0, clock: Clock | None = None, max_keys: int = 1024
    ) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock or SystemClock()
        self._max_keys = max_keys
        self._seen: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        # other threads log too (the Kubernetes credential provider's, asyncio.to_thread's)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """True to emit ``record``; a let-through record may gain a ``suppressed`` field."""
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        now = self._clock.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self._interval:
                self._seen[key] = (seen[0], seen[1] + 1)
                return False
            self._seen[key] = (now, 0)
            self._seen.move_to_end(key)
            if len(self._seen) > self._max_keys:
                self._seen.popitem(last=False)
        if seen is not None and seen[1]:
            fields: dict[str, Any] = dict(getattr(record, "fields", None) or {})
            fields["suppressed"] = seen[1]
            record.fields = fields
        return True


_last_second: tuple[int, str] = (-1, "")
_MILLIS = [f".{ms:03d}Z" for ms in range(1000)]


def _ts(created: float) -> str:
    """``2026-04-04T23:33:00.123Z``; the part up to the second is reused within a second."""
    global _last_second
    second = int(created)
    last = _last_second
    if last[0] == second:
        head = last[1]
    else:
        head = rfc3339(second)[:-1]  # without the Z
        _last_second = (second, head)
    return head + _MILLIS[int((created % 1) * 1000)]


def _json_value(value: Any) -> str:
    """One JSON value as ``json.dumps`` (ASCII) writes it."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float) and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, separators=(",", ":"), default=str)


_KEYS = {name: encode_basestring_ascii(name) for name in AUDIT_FIELDS}


def _members(fields: dict[str, Any]) -> str:
    """``"name":value`` pairs of ``fields``, comma-separated (``json.dumps``'s text)."""
    out = []
    for name, value in fields.items():
        key = _KEYS.get(name) or encode_basestring_ascii(name)
        text = encode_basestring_ascii(value) if type(value) is str else _json_value(value)
        out.append(f"{key}:{text}")
    return ",".join(out)


@functools.lru_cache(maxsize=1024, typed=True)
def _fixed_members(
    event: object, outcome: object, reason: object, username: object, namespace: object, pod: object
) -> str:
    """The audit members that repeat between two requests of one caller (kept for the most
    recent callers)."""
    values = (event, outcome, reason, username, namespace, pod)
    return _members(dict(zip(_AUDIT_KEYS[: len(values)], values, strict=True)))


def audit_json(created: float, fields: dict[str, Any]) -> str:
    """The audit line: ``ts`` then ``fields``, the very text ``json.dumps`` gives, built
    directly (the schema is fixed and flat); DEL escaped like every other control."""
    members = None
    latency_ms = fields.get("latency_ms")
    if tuple(fields) == _AUDIT_KEYS and type(latency_ms) is float and math.isfinite(latency_ms):
        get = fields.get
        try:
            fixed = _fixed_members(
                get("event"),
                get("outcome"),
                get("reason"),
                get("username"),
                get("namespace"),
                get("pod"),
            )
        except TypeError:  # an unhashable value: not from audit()
            fixed = None
        if fixed is not None:
            jti = get("jti")
            jti_text = encode_basestring_ascii(jti) if type(jti) is str else _json_value(jti)
            latency = float.__repr__(latency_ms)
            members = f'{fixed},"jti":{jti_text},"latency_ms":{latency}'
    line = f'{{"ts":"{_ts(created)}",{members or _members(fields)}}}'
    return line.replace("\x7f", "\\u007f") if "\x7f" in line else line


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; an audit record is exactly its fixed schema."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        audit_fields: dict[str, Any] | None = getattr(record, "audit", None)
        if audit_fields is not None:
            return audit_json(record.created, audit_fields)
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra: dict[str, Any] | None = getattr(record, "fields", None)
        if extra:
            out.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
        # json.dumps escapes C0 and (ensure_ascii) everything above 0x7f; DEL is left.
        return json.dumps(out, separators=(",", ":"), default=str).replace("\x7f", "\\u007f")


def _text_value(value: Any) -> str:
    """A field value for the text format; quoted when it could pass for several fields."""
    text = str(value)
    if not text or any(c in text for c in ' ="'):
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """Human-readable lines for `text` format; control characters are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        audit_fields: dict[str, Any] | None = getattr(record, "audit", None)
        ts = _ts(record.created)
        if audit_fields is not None:
            # The audit line keeps its fixed schema here too: every field, in order, an
            # absent value written as "-" (a refusal before authentication has no username).
            fields = {"ts": ts, **audit_fields}
            tail = " ".join(
                f"{k}={'-' if fields.get(k) is None else _text_value(fields[k])}"
                for k in AUDIT_FIELDS
            )
        else:
            extra: dict[str, Any] = getattr(record, "fields", None) or {}
            tail = " ".join(f"{k}={_text_value(v)}" for k, v in extra.items() if v is not None)
        base = f"{ts} {record.levelname.lower():7} {record.name}: "
        return escape_controls(base + record.getMessage() + (f" {tail}" if tail else ""))


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger to write to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn.access",):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


class AuditRecord(logging.LogRecord):
    """The audit line's log record, built without the generic constructor's per-record work
    (caller lookup, path splitting, level-name lookup, process names): the fields that do not
    change between two audit lines are copied from one record made at import.

    It is an ordinary :class:`logging.LogRecord` from there on: the logger's level and
    filters, the handlers' filters (the repeat filter) and formatters (escaping) apply.
    """

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(_AUDIT_TEMPLATE)
        created = time.time()
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _START) * 1000
        self.thread = threading.get_ident()
        self.threadName = threading.current_thread().name
        self.args = (fields["event"], fields["outcome"])
        self.audit = fields


_START = time.time()
_AUDIT_TEMPLATE = dict(
    vars(logging.LogRecord(audit_logger.name, logging.INFO, __file__, 0, "%s %s", (), None))
)
_AUDIT_TEMPLATE["process"] = os.getpid()


def audit(
    *,
    outcome: str,
    reason: str,
    username: str | None,
    namespace: str | None,
    pod: str | None,
    jti: str | None,
    latency_ms: float,
    event: str = "token_request",
) -> None:
    """Emit one audit line with the fixed schema (``ts`` is added by the formatter)."""
    if not audit_logger.isEnabledFor(logging.INFO):
        return
    record = AuditRecord(
        {
            "event": event,
            "outcome": outcome,
            "reason": reason,
            "username": username,
            "namespace": namespace,
            "pod": pod,
            "jti": jti,
            "latency_ms": round(latency_ms, 3),
        }
    )
    audit_logger.handle(record)
