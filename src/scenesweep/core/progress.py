"""Progress a person can read wherever it goes.

On a terminal: tqdm bars. Elsewhere (CI, ``make demo > log``, ``mlflow run`` piped): plain lines,
never a carriage return, at most one every ``SCENESWEEP_LOG_EVERY`` seconds (default 30) while the
work runs, and for a stage (an extraction, a test evaluation) one line when it ends, with its
count, seconds and rate. Inner loops (a head's epochs inside a trial) end silently: the trial's
own line says how it went.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

DEFAULT_EVERY_S = 30.0


def interactive(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal: bars there, lines elsewhere."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def every_s() -> float:
    """Seconds between progress lines off a terminal (``SCENESWEEP_LOG_EVERY``)."""
    try:
        return max(0.0, float(os.environ.get("SCENESWEEP_LOG_EVERY", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


class LineProgress:
    """tqdm's interface (``update``, ``set_postfix_str``, ``reset``, ``write``, ``close``,
    iteration) writing whole lines: 'extract vgg16/32px: 120/450 img (27 %), 35.1 img/s'."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, stage: bool = True, stream: TextIO | None = None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.stage = total, desc, unit, stage
        self.n = self.initial = initial
        self.postfix = ""
        self.stream = stream or sys.stderr
        self.began = self.last = time.monotonic()
        self.closed = False

    def _units(self, count: int) -> str:
        """'1 trial', '20 trials', '450 img' (abbreviations stay as they are)."""
        plural = count != 1 and len(self.unit) > 3 and self.unit.isalpha() and not self.unit.endswith("s")
        return f"{count} {self.unit}{'s' if plural else ''}"

    def _count(self) -> str:
        if not self.total:
            return self._units(self.n)
        return f"{self.n}/{self._units(self.total)} ({100 * self.n / self.total:.0f} %)"

    def _rate(self, elapsed: float) -> str:
        done = self.n - self.initial
        return f"{done / elapsed:.1f} {self.unit}/s" if elapsed > 0 and done > 0 else ""

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= every_s() and not (self.total and self.n >= self.total):
            self.last = now
            parts = [p for p in (self._count(), self._rate(now - self.began), self.postfix) if p]
            self._line(f"{self.desc}: {', '.join(parts)}")

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def reset(self, total: int | None = None) -> None:
        self.n = self.initial = 0
        self.total = total if total is not None else self.total
        self.began = self.last = time.monotonic()

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.stream, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stage and self.n > self.initial:
            elapsed = time.monotonic() - self.began
            rate = self._rate(elapsed)
            parts = [f"{self._units(self.n - self.initial)} in {elapsed:.1f} s", rate, self.postfix]
            self._line(f"{self.desc}: {', '.join(p for p in parts if p)}")

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, stage: bool = True) -> Any:
    """A tqdm bar on a terminal, a ``LineProgress`` elsewhere, nothing when ``disable``.

    Args:
        stage: off a terminal, write a closing line (count, seconds, rate): for a stage of its own
            (an extraction); not for a loop inside something that reports itself (a trial's epochs).
    """
    disable = disable or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    if disable or interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, stage=stage)
