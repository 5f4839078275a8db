"""Logging: one JSON object per line (or text for humans), and the audit line.

Nothing here ever receives a token; callers pass hashes or nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["AUDIT_FIELDS", "JsonFormatter", "audit", "setup_logging"]

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

audit_logger = logging.getLogger("cp_token.audit")


def _ts(created: float) -> str:
    ms = int((created % 1) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; an audit record is exactly its fixed schema."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        audit_fields: dict[str, Any] | None = getattr(record, "audit", None)
        if audit_fields is not None:
            return json.dumps({"ts": _ts(record.created), **audit_fields}, separators=(",", ":"))
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
        return json.dumps(out, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for `text` format."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        audit_fields: dict[str, Any] | None = getattr(record, "audit", None)
        extra = audit_fields if audit_fields is not None else getattr(record, "fields", None)
        tail = " ".join(f"{k}={v}" for k, v in (extra or {}).items() if v is not None)
        base = f"{_ts(record.created)} {record.levelname.lower():7} {record.name}: "
        return base + record.getMessage() + (f" {tail}" if tail else "")


def setup_logging(level: str = "info", fmt: str = "json") -> None:
    """Configure the root logger to write to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn.access",):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


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
    fields = {
        "event": event,
        "outcome": outcome,
        "reason": reason,
        "username": username,
        "namespace": namespace,
        "pod": pod,
        "jti": jti,
        "latency_ms": round(latency_ms, 3),
    }
    audit_logger.info("%s %s", event, outcome, extra={"audit": fields})
