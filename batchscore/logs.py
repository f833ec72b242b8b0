"""What batchscore tells people while it works, through ``logging``.

Every module logs to its own ``logging.getLogger(__name__)``; the CLI chooses the format once
(``configure``): text lines (``batchscore: ...``, ``Error: ...``) or one JSON object per line, for
events, progress, warnings and the final error alike. A library caller's own logging setup decides
what it sees; nothing is printed unless asked for. Progress is a bar only when the CLI writes text
to a terminal, otherwise a log line every ``LOG_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from datetime import datetime, timezone
from typing import IO, Any, TextIO

import click

LOG_INTERVAL_SECONDS = 10.0
LOGGER = "batchscore"


def event(name: str, **fields: Any) -> dict[str, Any]:
    """The ``extra`` of a log call that names its event and carries fields for JSON lines:
    ``log.info("...", extra=event("committed", rows_out=n))``."""
    return {"event": name, "fields": fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, event, message, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.levelname.lower()),
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``Error: ...`` for errors (the CLI's last line when it fails), ``batchscore: ...`` otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        text = ("Error: " if record.levelno >= logging.ERROR else "batchscore: ") + record.getMessage()
        if record.exc_info:  # a bug's traceback comes first, so that the error stays the last line
            text = self.formatException(record.exc_info) + "\n" + text
        return text


class _StderrHandler(logging.StreamHandler):
    """Writes to ``stream``, or to whatever ``sys.stderr`` is when a record arrives (so a test
    runner that swaps it per command sees each command's lines)."""

    def __init__(self, stream: IO[str] | None = None):
        logging.Handler.__init__(self)
        self._fixed = stream

    @property
    def stream(self) -> IO[str]:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: IO[str] | None) -> None:
        self._fixed = value


#: What ``configure`` chose: the format, the handler it installed, the progress interval.
_chosen: dict[str, Any] = {"format": None, "handler": None, "interval": LOG_INTERVAL_SECONDS}
_python_showwarning = warnings.showwarning


def configure(
    log_format: str = "text", stream: IO[str] | None = None, progress_interval: float = LOG_INTERVAL_SECONDS
) -> None:
    """Send log records, Python warnings under JSON, and progress to ``stream`` (stderr by default)
    in ``log_format``; the process's application (the CLI) calls this, a library never does.
    Calling it again replaces what the last call set up."""
    reset()
    handler = _StderrHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ours_or_a_warning)
    logging.getLogger().addHandler(handler)  # the root's: other libraries' warnings take the same form
    logging.getLogger(LOGGER).setLevel(logging.INFO)
    if log_format == "json":
        warnings.showwarning = _warning_as_record
    _chosen.update(format=log_format, handler=handler, interval=progress_interval)


def _ours_or_a_warning(record: logging.LogRecord) -> bool:
    """Our records at every level, other libraries' from WARNING up: a library that sets its own
    logger to INFO (py4j under Spark does) does not speak in batchscore's voice."""
    return record.name == LOGGER or record.name.startswith(LOGGER + ".") or record.levelno >= logging.WARNING


def reset() -> None:
    """Undo ``configure``."""
    if _chosen["handler"] is not None:
        logging.getLogger().removeHandler(_chosen["handler"])
        logging.getLogger(LOGGER).setLevel(logging.NOTSET)
    warnings.showwarning = _python_showwarning
    _chosen.update(format=None, handler=None, interval=LOG_INTERVAL_SECONDS)


def _warning_as_record(
    message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """A Python warning (e.g. scikit-learn's about a model's version) as a ``warning`` record."""
    logging.getLogger("py.warnings").warning(
        f"{category.__name__}: {message}",
        extra=event("warning", category=category.__name__, source=f"{filename}:{lineno}"),
    )


def progress(log: logging.Logger, total_rows: int) -> Progress:
    """Rows scored out of ``total_rows``: a bar if the CLI writes text to a terminal, else records on ``log``."""
    handler = _chosen["handler"]
    interactive = _chosen["format"] == "text" and handler is not None and handler.stream.isatty()
    return Progress(log, total_rows, _chosen["interval"], handler.stream if interactive else None)


class Progress:
    """Rows scored so far; a bar with rows/s and ETA when interactive, else periodic log records.

    Workers report every batch they score, so both move while a part is still being written.
    """

    def __init__(self, log: logging.Logger, total: int, interval: float, terminal: TextIO | None):
        self.log, self.total, self.interval, self.terminal = log, total, interval, terminal
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self._bar: Any = None

    def __enter__(self) -> Progress:
        if self.terminal is not None:
            self._bar = click.progressbar(
                length=max(self.total, 1),
                label="scoring",
                file=self.terminal,
                show_eta=True,
                show_percent=True,
                item_show_func=lambda _: f"{self.rate:,.0f} rows/s",
            )
            self._bar.__enter__()
        return self

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, rows: int) -> None:
        self.done += rows
        if self._bar is not None:
            self._bar.update(rows, current_item=self.done)
            return
        now = time.monotonic()
        if now - self.last_log >= self.interval:
            self.last_log = now
            share = self.done / self.total if self.total else 1.0
            eta = (self.total - self.done) / self.rate if self.rate else 0.0
            self.log.info(
                f"scored {self.done:,}/{self.total:,} rows ({share:.0%}), {self.rate:,.0f} rows/s, ETA {eta:,.0f}s",
                extra=event(
                    "progress",
                    rows_done=self.done,
                    rows_total=self.total,
                    rows_per_second=round(self.rate),
                    eta_seconds=round(eta),
                ),
            )

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
