"""Logging set-up: text or JSON lines, with every record scrubbed by the `Redactor`.

Fields passed through `extra=` (account, method, status, durations, outcome) become JSON
keys; the request id of the current request comes from a context variable set by the
access-log middleware. The redaction filter runs on the final text, so a secret handed to a
logger by mistake (in the message, an argument, an extra field or a traceback) is removed.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from typing import Any, TextIO

from nbgateway.redact import Redactor

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nbgw_request_id", default=None
)

# Attributes every LogRecord has; anything else was passed with `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class RedactingFormatter(logging.Formatter):
    """Formats a record as text or a JSON object, then scrubs secrets from the result."""

    def __init__(self, redactor: Redactor, *, json_lines: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor
        self._json = json_lines
        self._time_cache: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # strftime once per second, not once per line.
        second = int(record.created)
        if second != self._time_cache[0]:
            self._time_cache = (second, super().formatTime(record, datefmt)[:-4])
        return f"{self._time_cache[1]},{int(record.msecs):03d}"

    def _scrub_fields(self, texts: dict[str, str]) -> dict[str, str]:
        values = list(texts.values())
        if not any("\n" in value for value in values):
            scrubbed = self._redactor.scrub("\n".join(values)).split("\n")
            if len(scrubbed) == len(values):
                return dict(zip(texts, scrubbed, strict=True))
        return {key: self._redactor.scrub(value) for key, value in texts.items()}

    def format(self, record: logging.LogRecord) -> str:
        request_id = request_id_var.get()
        extras = _extras(record)
        if self._json:
            doc: dict[str, Any] = {
                "ts": round(record.created, 6),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
            if request_id is not None:
                doc["request_id"] = request_id
            texts = {"message": record.getMessage()}
            for key, value in extras.items():
                if isinstance(value, int | float | bool) or value is None:
                    doc[key] = value
                else:
                    texts[key] = str(value)
            if record.exc_info:
                texts["exception"] = self.formatException(record.exc_info)
            # Scrubbed before encoding (patterns must see raw text, not JSON escapes), all
            # fields in one pass: joined by newlines, which no secret pattern crosses.
            doc.update(self._scrub_fields(texts))
            return json.dumps(doc, ensure_ascii=False)
        else:
            text = super().format(record)
            tail = " ".join(f"{k}={v}" for k, v in extras.items())
            if request_id is not None:
                tail = f"request_id={request_id} {tail}".rstrip()
            if tail:
                text = f"{text} [{tail}]"
        return self._redactor.scrub(text)


def configure_logging(
    redactor: Redactor,
    *,
    fmt: str = "text",
    level: str = "INFO",
    stream: TextIO | None = None,
    access_log: bool = True,
) -> logging.Handler:
    """Route the `nbgateway` and `aiohttp` loggers through one redacting handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(redactor, json_lines=fmt == "json"))
    for name in ("nbgateway", "aiohttp"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old.formatter, RedactingFormatter):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    # NBGW_ACCESS_LOG=off: the per-request lines go, everything else stays.
    logging.getLogger("nbgateway.access").setLevel(
        logging.NOTSET if access_log else logging.WARNING
    )
    # aiohttp's own access log would print raw query strings; ours is redacted.
    logging.getLogger("aiohttp.access").disabled = True
    # Per-record facts nobody reads here; skipping them keeps an access line cheap
    # (finding the caller's frame alone costs more than formatting the line).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented in logging/__init__.py; no public switch exists
    return handler
