"""How `mesh node` logs: text for people, or JSON lines for log shippers (`log_format = "json"`).

A JSON line is one object: `time` (UTC, ISO 8601 with milliseconds), `level` (debug, info,
warning, error, critical), `logger`, `message`, `node_id`, and `exception` (the traceback)
when there is one. Fluent Bit, Vector, Promtail and journald's JSON parsers read it as is.
gRPC's C core writes its own lines to stderr outside Python logging; they stay text (they
are off unless GRPC_VERBOSITY asks for them).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped by JSON)."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "node_id": self.node_id,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["exception"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(*, level: str, log_format: str, node_id: str, stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr) at `level` and above, as text or JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter(node_id))
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log_format must be text or json, got {log_format!r}")
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)
