r"""Progress of long steps, through the ``foldcompile`` logger hierarchy (stderr under the CLI).

- :func:`stage` times one step and logs its start and its duration at INFO; the duration rides
  on the log record (``record.foldcompile_stage = (name, seconds)``), so whoever listens — the
  CLI's :class:`StageTimes` for ``foldcompile explain -v`` — gets every stage's time without any
  global state.
- :class:`Bar` counts steps whose number is known (rules, runs): on a terminal it redraws one
  line on stderr; elsewhere (a pipe, a log file, a test) it logs each step at INFO instead.
- :func:`rules_with_progress` wraps fusion rules so a :class:`Bar` advances as each rule starts.

Nothing is shown unless the application enables INFO on ``foldcompile`` (the CLI's ``-v``)::

    >>> import logging
    >>> times = StageTimes()
    >>> log = logging.getLogger("foldcompile.example")
    >>> log.addHandler(times); log.setLevel(logging.INFO)
    >>> with stage("capture", log):
    ...     pass
    >>> [name for name, _ in times.stages]
    ['capture']
    >>> log.removeHandler(times)
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

__all__ = ["STAGE", "stage", "Bar", "StageTimes", "rules_with_progress"]

STAGE = "foldcompile_stage"  # the LogRecord attribute carrying (stage name, seconds)

_log = logging.getLogger("foldcompile.progress")


def stage_done(log: logging.Logger, name: str, seconds: float) -> None:
    """Log a finished stage (``name: 1.23 s``) with its time on the record."""
    log.info("%s: %.2f s", name, seconds, extra={STAGE: (name, seconds)})


@contextmanager
def stage(name: str, log: logging.Logger = _log) -> Iterator[None]:
    """Log ``name ...`` at the start and ``name: S s`` at the end (also when it raises)."""
    log.info("%s ...", name)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stage_done(log, name, time.perf_counter() - t0)


class Bar:
    """A step counter for ``total`` steps of ``what`` (``Bar(4, "fuse rules")``).

    ``advance(label)`` starts the next step. On a terminal (stderr is a TTY and INFO is enabled
    on ``log``) one line is redrawn: ``fuse rules [#####     ] 2/4 softmax``; otherwise each step
    is a log line. ``close()`` ends the line and logs the whole count with its time.
    """

    def __init__(self, total: int, what: str, log: logging.Logger = _log, stream: Any = None):
        self.total, self.what, self.log = total, what, log
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = log.isEnabledFor(logging.INFO)
        self.tty = self.enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._t0: float | None = None  # the first step's start: a bar made ahead of its work waits
        self._closed = False

    def advance(self, label: str = "") -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        self.done = min(self.done + 1, self.total)
        if not self.enabled:
            return
        if self.tty:
            width = 24
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(f"\r{self.what} [{'#' * filled}{' ' * (width - filled)}] {self.done}/{self.total} "
                              f"{label[:40]:<40}")
            self.stream.flush()
        else:
            self.log.info("%s %d/%d%s", self.what, self.done, self.total, f": {label}" if label else "")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
        if self.enabled and self._t0 is not None:
            stage_done(self.log, self.what, time.perf_counter() - self._t0)


class StageTimes(logging.Handler):
    """A logging handler that keeps every stage's ``(name, seconds)`` in order (see :func:`stage`)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.stages: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        item = getattr(record, STAGE, None)
        if item is not None:
            self.stages.append(item)

    def table(self) -> list[str]:
        """``stage timings:`` and one aligned line a stage."""
        if not self.stages:
            return []
        width = max(len(name) for name, _ in self.stages)
        return ["stage timings:"] + [f"  {name:<{width}}  {seconds:8.2f} s" for name, seconds in self.stages]


def rules_with_progress(rules: Sequence[Any], log: logging.Logger = _log) -> tuple[list[Any], "Bar"]:
    """Fusion rules (``passes.rules.Rule``, frozen dataclasses) that advance one :class:`Bar` as each
    starts, in the order the fuse pass runs them (highest priority first), and that bar. The
    fuse pass calls a rule's ``recognise`` on every node; the first call is the rule's start.
    Close the bar when the pass is done (its whole time is logged as a stage)."""
    ordered = sorted(rules, key=lambda r: -r.priority)
    bar = Bar(len(ordered), "fuse rules", log)
    started: set[tuple[int, str]] = set()

    def wrap(rule: Any) -> Any:
        recognise = rule.recognise

        def recognise_with_progress(node: Any, ctx: Any) -> Any:
            key = (id(node.graph), rule.name)  # a checkpoint body is another graph: its rules run again
            if key not in started:
                started.add(key)
                if bar.done == bar.total:  # the next graph's pass over the rules
                    bar.done = 0
                bar.advance(rule.name)
            return recognise(node, ctx)

        return dataclasses.replace(rule, recognise=recognise_with_progress)

    return [wrap(r) for r in ordered], bar
