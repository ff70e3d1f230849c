"""Log lines no logged value can forge: one JSON object per line, or escaped text.

A value that reaches a log (a job id from the broker, a dataset name, a path from a request)
may hold a newline; written as it is, it starts a line of its own that reads like one of ours
("... INFO job ... succeeded"). So:

- "json" (the default for `bitserve api` and `bitserve worker`, whose logs go to a collector):
  each record is one JSON object on one line, {"time", "level", "logger", "message"} plus
  "exception" (the traceback) when there is one, and, for uvicorn's access log, "client",
  "method", "path", "status". Every control character is escaped by JSON itself.
- "text" (the default for `bitserve up`, read on a terminal): "time level logger: message",
  with control and format characters in the message written as escapes (\\n, \\u202e); only a
  traceback spans several lines, each indented below its record.

BITSERVE_LOG_FORMAT chooses (service.settings). The gateway applies it through uvicorn's log
config (service.cli), the worker through Celery's `setup_logging` signal (worker.celery_app).
"""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]
FORMATTERS = {
    "json": "service.log_format.JsonFormatter",
    "text": "service.log_format.TextFormatter",
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        args = record.args
        # uvicorn's access record: (client, method, path, http version, status).
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _version, status = args
            entry.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        # ASCII only: JSON leaves U+2028, U+2029 and U+0085 raw, and readers that split on
        # every line break (Python's splitlines, some collectors) would cut the record there.
        return json.dumps(entry, ensure_ascii=True, default=str)


class TextFormatter(logging.Formatter):
    """ "time level logger: message", the message's control characters escaped."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        # A traceback is ours (code and repr()s) but may quote a value: indent every line so
        # none can pass for a record of its own.
        return "\n".join("    " + escape(line) for line in super().formatException(ei).splitlines())


def escape(text: str) -> str:
    """`text` with control, format and line-separator characters as Python escapes."""
    if all(unicodedata.category(c) not in _UNPRINTABLE for c in text):
        return text
    return "".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNPRINTABLE else c
        for c in text
    )


def formatter(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def configure_root(log_format: LogFormat, level: int | str = logging.INFO) -> None:
    """Send every logger's records to stderr in `log_format` (a process without uvicorn)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
