"""Structured, quiet-by-default logging: one JSON object per line on stderr.

Log calls use an event name as the message and put fields in ``extra``:
``log.info("silo.ready", extra={"silo": name})``.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line with its `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str = "warning") -> None:
    """Send tff_amqp logs to stderr as JSON lines; keep TF/absl noise down."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("tff_amqp")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    # aiormq logs every failed connection attempt as an error; our retry
    # policy reports the outcome once, clearly. Shown only when debugging.
    debugging = level.upper() == "DEBUG"
    logging.getLogger("aiormq.connection").setLevel(
        logging.DEBUG if debugging else logging.CRITICAL
    )
