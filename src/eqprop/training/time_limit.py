"""A wall-clock limit for a training run: stop at an epoch boundary while the next epoch still fits.

A batch job with a time limit (a SLURM allocation, a lent GPU's 10-minute call, a session that
ends) kills a run wherever it is; the last checkpoint survives, but the epoch in progress is lost.
With a :class:`TimeLimit` the run instead ends after the last epoch it expects to finish in time,
and ``eqprop train --resume`` continues it in the next job. An epoch is expected to take as long
as the longest of the last three (training, evaluation and checkpoint, as the clock saw them); the
first epoch always runs, since nothing predicts it.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable

#: ``eqprop train``'s exit status for a run stopped at its time limit, not finished: sysexits'
#: EX_TEMPFAIL ("try again later"), which a job script can test to resubmit itself
EXIT_TIME_LIMIT = 75

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a positive number with an optional unit s, m or h (``90s``, ``50m``,
    ``1.5h``); a bare number is minutes. Raises ValueError with a one-line message."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: write e.g. 90s, 50m or 2h (a bare number is minutes)")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "m"]
    if seconds <= 0:
        raise ValueError(f"the time limit must be positive, got {text!r}")
    return seconds


class TimeLimit:
    """The wall-clock budget of one training call, counted from its creation.

    :meth:`another_epoch_fits` is called before every epoch; each call after the first closes the
    epoch that ran since the previous one (a rolled-back epoch counts too: it took the time)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not seconds > 0:
            raise ValueError(f"the time limit must be positive, got {seconds}")
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()
        self._last: float | None = None   # the clock at the previous call; None before the first
        self._epochs: list[float] = []

    def another_epoch_fits(self) -> bool:
        """Whether one more epoch, as long as the longest of the last three, ends within the limit."""
        now = self._clock()
        if self._last is None:
            self._last = now
            return True
        self._epochs.append(now - self._last)
        self._last = now
        return now - self._start + self.expected_epoch() <= self.seconds

    def expected_epoch(self) -> float:
        """Seconds the next epoch is expected to take (0 before any epoch has ended)."""
        return max(self._epochs[-3:], default=0.0)

    def describe(self) -> str:
        """The limit as a reader wants it: ``50m``, ``2h``, ``90s``."""
        for unit, size in (("h", 3600.0), ("m", 60.0)):
            if self.seconds >= size and (self.seconds / size).is_integer():
                return f"{self.seconds / size:g}{unit}"
        return f"{self.seconds:g}s"
