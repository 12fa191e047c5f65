"""Dropped messages: counted per reason, logged at most once per reason per interval.

A peer that floods us with bad messages cannot flood the log: the first drop of a reason is
logged at once, later ones are summed and logged as one line (with the count and the last
detail) when the interval has passed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger(__name__)

PREFIX = "dropped."
"""Stats key of a drop counter: ``dropped.<reason>``."""


class DropLog:
    """Counts drops into ``stats`` (``dropped.<reason>``) and logs them rate-limited."""

    def __init__(self, owner: str, stats: Counter[str], interval_s: float) -> None:
        self._owner = owner
        self._stats = stats
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last_log: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def drop(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._stats[PREFIX + reason] += 1
            self._unlogged[reason] += 1
            last = self._last_log.get(reason)
            if last is not None and now - last < self._interval_s:
                return
            count, self._unlogged[reason] = self._unlogged[reason], 0
            self._last_log[reason] = now
        if last is None:
            log.warning("%s: dropped a message (%s): %s", self._owner, reason, detail)
        else:
            log.warning("%s: dropped %d messages (%s) in the last %.0f s; last: %s",
                        self._owner, count, reason, now - last, detail)


def drop_counts(*stats: Counter[str]) -> dict[str, int]:
    """``{reason: count}`` summed over the ``dropped.<reason>`` entries of several stats counters."""
    out: Counter[str] = Counter()
    for counter in stats:
        for key, value in list(counter.items()):
            if key.startswith(PREFIX):
                out[key[len(PREFIX):]] += value
    return dict(out)
