"""Logging set-up: text or JSON lines, with every record scrubbed by the `Redactor`.

Fields passed through `extra=` (account, method, status, durations, outcome) become JSON
keys; the request id of the current request comes from a context variable set by the
access-log middleware. The redaction filter runs on the final text, so a secret handed to a
logger by mistake (in the message, an argument, an extra field or a traceback) is removed.

The per-request access line is the one exception to "everything is a LogRecord": it is
the most frequent line by far, so `configure_logging` gives its handler an `AccessLog`
that renders the same line (same text or JSON, same fields, same order) straight from the
request's fields, scrubbing each value once rather than the finished line, and hands it
to the handler, which writes the lines of one event-loop turn together, in order with
every other record.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, TextIO

from nbgateway.errors import StoreError
from nbgateway.redact import Redactor

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "nbgw_request_id", default=None
)

ACCESS_LOGGER = "nbgateway.access"
# Loggers whose lines carry the request id of the context they were logged in.
_REQUEST_LOGGERS = ("nbgateway", "aiohttp")
_REQUEST_LOGGER_PREFIXES = tuple(name + "." for name in _REQUEST_LOGGERS)

# Attributes every LogRecord has; anything else was passed with `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Access-line values whose scrubbed form is remembered: how many, and how long at most.
_KNOWN_KEPT = 4096
_KNOWN_MAX_LEN = 256
# Access lines held before the handler writes them anyway (normally: once per loop turn).
_PENDING_MAX = 256
_NUMBERS = (int, float)  # a tuple: isinstance is quicker with it than with int | float
# ",000" to ",999": the millisecond part of a text timestamp.
_MILLIS = tuple(f",{n:03d}" for n in range(1000))
# JSON string encoding as json.dumps(ensure_ascii=False) does it (C implementation).
_json_str = json.encoder.encode_basestring


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class RedactingFormatter(logging.Formatter):
    """Formats a record as text or a JSON object, then scrubs secrets from the result."""

    def __init__(self, redactor: Redactor, *, json_lines: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redactor = redactor
        self.json_lines = json_lines
        self._time_cache: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.asctime(record.created)

    def asctime(self, created: float) -> str:
        """`created` as logging's default %(asctime)s; strftime once per second, not per line."""
        second = int(created)
        if second != self._time_cache[0]:
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self._time_cache = (second, stamp)
        # LogRecord.msecs is computed this way too.
        return self._time_cache[1] + _MILLIS[int((created - second) * 1000)]

    def scrub_fields(self, texts: dict[str, str]) -> dict[str, str]:
        values = list(texts.values())
        if not any("\n" in value for value in values):
            scrubbed = self._redactor.scrub("\n".join(values)).split("\n")
            if len(scrubbed) == len(values):
                return dict(zip(texts, scrubbed, strict=True))
        return {key: self._redactor.scrub(value) for key, value in texts.items()}

    def format(self, record: logging.LogRecord) -> str:
        # Only the gateway's and aiohttp's lines speak for the request they run in: a
        # library's background task (asyncpg's pool restoring its connections) inherits
        # the id of whichever request happened to start it.
        name = record.name
        ours = name in _REQUEST_LOGGERS or name.startswith(_REQUEST_LOGGER_PREFIXES)
        request_id = request_id_var.get() if ours else None
        extras = _extras(record)
        if record.exc_info and record.levelno < logging.ERROR:
            # A warning (a library's expected trouble: asyncpg's pool during a database
            # restart, say) names its exception in one line; errors keep the traceback.
            exc = record.exc_info[1]
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info, record.exc_text = None, None
            if exc is not None:
                extras["exception"] = one_line(f"{type(exc).__name__}: {exc}")
        if self.json_lines:
            doc: dict[str, Any] = {
                "ts": round(record.created, 6),
                "level": record.levelname.lower(),
                "logger": record.name,
            }
            texts = {"message": record.getMessage()}
            if request_id is not None:
                doc["request_id"] = None  # its place; the scrubbed value follows
                texts["request_id"] = request_id
            for key, value in extras.items():
                if isinstance(value, int | float | bool) or value is None:
                    doc[key] = value
                else:
                    texts[key] = str(value)
            if record.exc_info:
                texts["exception"] = self.formatException(record.exc_info)
            # Scrubbed before encoding (patterns must see raw text, not JSON escapes), all
            # fields in one pass: joined by newlines, which no secret pattern crosses.
            scrubbed = self.scrub_fields(texts)
            if request_id is not None:
                doc["request_id"] = scrubbed.pop("request_id")
            doc.update(scrubbed)
            return json.dumps(doc, ensure_ascii=False)
        else:
            text = super().format(record)
            tail = " ".join(f"{k}={v}" for k, v in extras.items())
            if request_id is not None:
                tail = f"request_id={request_id} {tail}".rstrip()
            if tail:
                text = f"{text} [{tail}]"
        return self._redactor.scrub(text)


class AccessLog:
    """Renders the access line of one request without a LogRecord.

    The line is the one `RedactingFormatter` makes of `log.info("%s %s %s", method, path,
    status, extra=fields)` on the access logger: the same text or JSON, fields and order.
    Redaction runs once per value instead of over the finished line (where the path, say,
    appears twice), and a value's scrubbed form is remembered: method, peer, account and
    most paths repeat from request to request, so most lines need no scrubbing at all.
    The memory holds at most `_KNOWN_KEPT` values of at most `_KNOWN_MAX_LEN` characters,
    and starts over when the redactor learns a new secret (`Redactor.generation`). Longer
    values are scrubbed together in one pass. A request id the gateway generated itself
    (random hex) holds no secret and is not scrubbed.
    """

    def __init__(self, formatter: RedactingFormatter, redactor: Redactor) -> None:
        self._formatter = formatter
        self._redactor = redactor
        self._json = formatter.json_lines
        self._known: dict[str, str] = {}
        self._templates: dict[tuple[tuple[tuple[str, Any], ...], tuple[type, ...]], _Template] = {}
        self._known_generation = -1

    def _scrubbed_together(self, values: list[str]) -> list[str]:
        """Each value scrubbed: in one pass when no value holds a newline (the separator,
        which no secret pattern crosses), else one by one."""
        scrub = self._redactor.scrub
        if len(values) == 1:
            return [scrub(values[0])]
        joined = "\n".join(values)
        if joined.count("\n") == len(values) - 1:
            scrubbed = scrub(joined).split("\n")
            if len(scrubbed) == len(values):
                return scrubbed
        return [scrub(value) for value in values]

    def render(
        self,
        fields: Mapping[str, Any],
        request_id: str | None,
        created: float,
        *,
        id_is_ours: bool = False,
        duration_ms: float | None = None,
    ) -> str:
        """The line for one request: `fields` are the access extras (method, path, peer,
        account, status ...), in their order, and `duration_ms`, when given, the last of
        them; `id_is_ours` says the gateway generated `request_id`.

        Everything but the time, the request id and the duration repeats from request to
        request, so the rest of the line is made once per distinct set of fields (a
        `_Template`, remembered like the scrubbed values) and the line is put together
        from it."""
        redactor = self._redactor
        templates = self._templates
        if self._known_generation != redactor.generation or len(self._known) >= _KNOWN_KEPT:
            self._known.clear()
            templates.clear()
            self._known_generation = redactor.generation
        elif len(templates) >= _KNOWN_KEPT:
            templates.clear()
        # The types too: 1, 1.0 and True are equal keys but different text.
        key = (tuple(fields.items()), tuple(map(type, fields.values())))
        try:
            template = templates.get(key)
            hashable = True
        except TypeError:  # a value that cannot be a key (a list, say): made each time
            template, hashable = None, False
        if template is None:
            template = self._template(fields)
            if hashable and template.kept:
                templates[key] = template
        if request_id is not None and not id_is_ours:
            # Not remembered: tools that send one id per request would only fill the memory.
            request_id = self._redactor.scrub(request_id)
        if not self._json:
            tail = template.tail
            if duration_ms is not None:
                tail = f"{tail} duration_ms={duration_ms}" if tail else f"duration_ms={duration_ms}"
            if request_id is not None:
                tail = f"request_id={request_id} {tail}".rstrip()
            return f"{self._formatter.asctime(created)}{template.head}{tail}]"
        # Key order as RedactingFormatter's: ts, level, logger, request_id, the plain
        # fields, the message, the text fields.
        rid = "" if request_id is None else f', "request_id": {_json_str(request_id)}'
        duration = "" if duration_ms is None else f', "duration_ms": {_json_literal(duration_ms)}'
        return (
            f'{{"ts": {round(created, 6)!r}, "level": "info", "logger": "{ACCESS_LOGGER}"'
            f"{rid}{template.head}{duration}{template.tail}}}"
        )

    def _template(self, fields: Mapping[str, Any]) -> _Template:
        """The parts of the line `fields` give, every value scrubbed."""
        json_lines = self._json
        known = self._known
        kept = True
        # Values not remembered, scrubbed in one pass at the end, and where they go.
        keys: list[str] = []
        values: list[str] = []
        shown: dict[str, str] = {}  # field -> its text (text format) or JSON literal
        plain: set[str] = set()  # numbers, booleans and None: JSON literals, never scrubbed
        for key, value in fields.items():
            if isinstance(value, str):
                text = value
            elif value is None or isinstance(value, _NUMBERS):
                plain.add(key)
                shown[key] = _json_literal(value) if json_lines else str(value)
                continue
            else:
                text = str(value)
            clean = known.get(text)
            if clean is not None:
                shown[key] = clean
            elif len(text) <= _KNOWN_MAX_LEN:
                shown[key] = known[text] = self._redactor.scrub(text)
            else:
                kept = False  # a long value: neither it nor its line is remembered
                keys.append(key)
                values.append(text)
                shown[key] = text
        if values:
            for key, clean in zip(keys, self._scrubbed_together(values), strict=True):
                shown[key] = clean
        message = f"{shown['method']} {shown['path']} {fields['status']}"
        if not json_lines:
            return _Template(
                f" INFO {ACCESS_LOGGER}: {message} [", " ".join(map("=".join, shown.items())), kept
            )
        plains = "".join(f", {_json_str(k)}: {v}" for k, v in shown.items() if k in plain)
        texts = "".join(
            f", {_json_str(k)}: {_json_str(v)}" for k, v in shown.items() if k not in plain
        )
        return _Template(plains, f', "message": {_json_str(message)}{texts}', kept)


class _Template(NamedTuple):
    """What an access line's fields give, once scrubbed: in text, the part after the time
    (`head`) and the bracketed fields (`tail`); in JSON, the plain fields (`head`) and the
    message with the text fields (`tail`). `kept`: made only of remembered values."""

    head: str
    tail: str
    kept: bool


def _json_literal(value: float | bool | None) -> str:
    """A number, boolean or None as json.dumps writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


class LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler `configure_logging` installs: records through `RedactingFormatter`,
    access lines through `access(...)`.

    Access lines are collected and written together once per event-loop turn (one write
    instead of one per request); any other record, a flush and closing write them first,
    so lines keep their order.
    """

    def __init__(self, stream: TextIO, formatter: RedactingFormatter, redactor: Redactor) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.access_log = AccessLog(formatter, redactor)
        self._pending: list[str] = []

    def access(
        self,
        fields: Mapping[str, Any],
        request_id: str | None,
        *,
        id_is_ours: bool = False,
        duration_ms: float | None = None,
    ) -> None:
        """Log one request's access line (the arguments as `AccessLog.render` takes them)."""
        line = self.access_log.render(
            fields, request_id, time.time(), id_is_ours=id_is_ours, duration_ms=duration_ms
        )
        with self.lock:  # type: ignore[union-attr]
            pending = self._pending
            pending.append(line + self.terminator)
            if len(pending) > 1 and len(pending) < _PENDING_MAX:
                return  # a write is already scheduled
        if len(pending) >= _PENDING_MAX:
            self.flush()
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # not on an event loop: write now
            self.flush()

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write_pending()
            except Exception:
                self._pending.clear()
                raise
        super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            try:
                self._write_pending()
            except Exception:
                self._pending.clear()
                self.handleError(record)
        super().emit(record)


def access_handler(logger: logging.Logger) -> LogHandler | None:
    """The handler to give `logger`'s INFO lines to directly, or None for `logger.info`.

    Only when a record from `logger` would reach exactly one `LogHandler` and nothing else
    (no filter, no other handler): then the direct line is the same as the record's.
    """
    if logger.handlers or logger.filters or not logger.propagate or logger.disabled:
        return None
    parent = logger.parent
    if parent is None or parent.propagate or parent.filters or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if type(handler) is not LogHandler or handler.filters or handler.level > logging.INFO:
        return None
    return handler


def one_line(text: str) -> str:
    """`text` with its line breaks (and runs of blanks) as single spaces."""
    return " ".join(text.split())


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` while the gateway's logging is configured: one WARNING line
    on the `py.warnings` logger (the name `logging.captureWarnings` uses)."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%s)", category.__name__, one_line(str(message)), filename, lineno
    )


def configure_logging(
    redactor: Redactor,
    *,
    fmt: str = "text",
    level: str = "INFO",
    stream: TextIO | None = None,
    access_log: bool = True,
) -> logging.Handler:
    """Route the `nbgateway` and `aiohttp` loggers through one redacting handler, and every
    other library's warnings and errors too (asyncpg's pool, asyncio's "exception never
    retrieved", ...): the root logger gets the same handler at WARNING (or `level` when
    stricter), so no line leaves unredacted or outside NBGW_LOG_FORMAT."""
    formatter = RedactingFormatter(redactor, json_lines=fmt == "json")
    handler = LogHandler(stream or sys.stderr, formatter, redactor)
    for name in ("nbgateway", "aiohttp", None):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old.formatter, RedactingFormatter):
                logger.removeHandler(old)
        logger.addHandler(handler)
        if name is None:
            logger.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
        else:
            logger.setLevel(level)
            logger.propagate = False
    # NBGW_ACCESS_LOG=off: the per-request lines go, everything else stays.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)
    # aiohttp's own access log would print raw query strings; ours is redacted.
    logging.getLogger("aiohttp.access").disabled = True
    # Python warnings (a library's UserWarning, a DeprecationWarning) as one-line log
    # records in NBGW_LOG_FORMAT, instead of raw lines on stderr.
    warnings.showwarning = _log_warning
    # Per-record facts nobody reads here; skipping them keeps an access line cheap
    # (finding the caller's frame alone costs more than formatting the line).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented in logging/__init__.py; no public switch exists
    return handler


async def background_round(
    logger: logging.Logger, what: str, step: Callable[[], Awaitable[object]]
) -> None:
    """One round of a background loop: a store outage said in one line, anything else with
    its traceback, and the loop goes on (only a cancellation ends it)."""
    try:
        await step()
    except asyncio.CancelledError:
        raise
    except StoreError as exc:  # an outage, retried next round
        logger.warning(f"{what}: the store cannot be used; continuing", extra={"error": str(exc)})
    except Exception:
        logger.exception(f"{what} failed; continuing")
