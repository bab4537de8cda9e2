"""Structured logs (issue 7): one JSON object per line on stderr — time, level, node, component
(the logger's name), message, correlation ids a call site passes as `extra` (task_id,
executor_id, trace_id — the current span's when it is sampled) and the traceback, if any — or `--log-format text` for humans. Anything
that looks like a token or key is masked before either format sees it (security/secrets.py)."""

from __future__ import annotations

import datetime
import json
import logging
import sys

from opentelemetry import trace

from security.secrets import MaskingFilter, mask

CORRELATION_FIELDS = ("task_id", "executor_id", "trace_id")
LOG_FORMATS = ("json", "text")


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "node": self.node,
            "component": record.name,
            "message": record.getMessage(),
        }
        for name in CORRELATION_FIELDS:
            value = getattr(record, name, None)
            if value:
                data[name] = value
        if "trace_id" not in data:
            # Logged inside a sampled span (a traced call, an attempt): the line joins its trace.
            context = trace.get_current_span().get_span_context()
            if context.is_valid and context.trace_flags.sampled:
                data["trace_id"] = f"{context.trace_id:032x}"
        if record.exc_info:
            data["exc"] = mask(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False)


class MaskedTextFormatter(logging.Formatter):
    """The text format, masked as a whole: a traceback carries exception messages too."""

    def format(self, record: logging.LogRecord) -> str:
        return mask(super().format(record))


def configure_logging(level: str, log_format: str = "json", node: str = "") -> None:
    """Logs to stderr in `log_format` ("json" or "text"), masked."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format: one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(MaskedTextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
