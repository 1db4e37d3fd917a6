"""Host code. Structured logs: one JSON object per line, with the trace id when there is one.

    setup_logging("INFO")                                   # the `edgeline` loggers, to stderr
    log.info("anomaly on %s", key, extra={"trace_id": ev.trace_id, "node": ev.node})

gives

    {"ts":"2025-01-02T03:04:05.678Z","level":"INFO","logger":"edgeline.gateway",
     "msg":"anomaly on s/l/m","trace_id":"0af7651916cd43dd8448eb211c80319c","node":"node-1"}

(on one line). `trace_id` and `span_id` may be given as bytes (the wire's form) or text; bytes
are written as lowercase hex, as W3C trace context spells them. Without one in `extra`, the
current OpenTelemetry span's ids are used if OpenTelemetry is already loaded (it is never
imported from here). Other `extra` fields are copied as they are (repr when not JSON).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import IO, Any

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_IDS = ("trace_id", "span_id")


def _hex(v: Any) -> Any:
    return v.hex() if isinstance(v, (bytes, bytearray, memoryview)) else v


def _otel_ids() -> dict[str, str]:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": f"{ctx.trace_id:032x}", "span_id": f"{ctx.span_id:016x}"}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)
    return v


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (UTC, ms), level, logger, msg, the trace and
    span ids when known, the `extra` fields, and exc/stack text when present."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = {k: _hex(getattr(record, k)) for k in _IDS if getattr(record, k, None)}
        out.update(ids or _otel_ids())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _IDS and not key.startswith("_"):
                out[key] = _jsonable(_hex(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def setup_logging(
    level: int | str = logging.INFO,
    *,
    json_lines: bool = True,
    stream: IO[str] | None = None,
    logger: str = "edgeline",
) -> logging.Handler:
    """Send `logger` (and its children) to `stream` (stderr), as JSON lines or plain text.

    Replaces a handler an earlier call installed, so calling it twice does not log twice.
    Returns the handler.
    """
    target = logging.getLogger(logger)
    for h in list(target.handlers):
        if getattr(h, "_edgeline", False):
            target.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if json_lines else plain)
    handler._edgeline = True  # type: ignore[attr-defined]
    target.addHandler(handler)
    target.setLevel(level)
    target.propagate = False
    return handler
