"""What a run tells people while it works: a progress bar in a terminal, log lines elsewhere."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from typing import IO, Any

import click

LOG_INTERVAL_SECONDS = 10.0


def json_line(level: str, event: str, message: str, **fields: Any) -> str:
    """One JSON log record: events, warnings and the final error share this shape."""
    record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "level": level, "event": event,
              "message": message, **fields}
    return json.dumps(record, default=str)


class Reporter:
    """Writes events to stderr as text or JSON lines; ``progress`` tracks rows against a total."""

    def __init__(
        self, log_format: str = "text", stream: IO[str] | None = None, quiet: bool = False,
        log_interval: float = LOG_INTERVAL_SECONDS,
    ):
        self.log_format = log_format
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.log_interval = log_interval  # seconds between progress lines when not interactive

    def event(self, name: str, message: str, **fields: Any) -> None:
        if self.quiet:
            return
        if self.log_format == "json":
            self.stream.write(json_line("info", name, message, **fields) + "\n")
        else:
            self.stream.write(f"batchscore: {message}\n")
        self.stream.flush()

    def progress(self, total_rows: int) -> "Progress":
        interactive = self.log_format == "text" and not self.quiet and self.stream.isatty()
        return Progress(self, total_rows, interactive)


class Progress:
    """Rows scored so far; a bar with rows/s and ETA when interactive, else periodic log lines.

    Workers report every batch they score, so both move while a part is still being written.
    """

    def __init__(self, reporter: Reporter, total: int, interactive: bool):
        self.reporter, self.total, self.interactive = reporter, total, interactive
        self.done = 0
        self.started = self.last_log = time.monotonic()
        self._bar: Any = None

    def __enter__(self) -> "Progress":
        if self.interactive:
            self._bar = click.progressbar(
                length=max(self.total, 1), label="scoring", file=self.reporter.stream, show_eta=True,
                show_percent=True, item_show_func=lambda _: f"{self.rate:,.0f} rows/s",
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
        if now - self.last_log >= self.reporter.log_interval:
            self.last_log = now
            share = self.done / self.total if self.total else 1.0
            eta = (self.total - self.done) / self.rate if self.rate else 0.0
            self.reporter.event(
                "progress", f"scored {self.done:,}/{self.total:,} rows ({share:.0%}), {self.rate:,.0f} rows/s, ETA {eta:,.0f}s",
                rows_done=self.done, rows_total=self.total, rows_per_second=round(self.rate), eta_seconds=round(eta),
            )

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
