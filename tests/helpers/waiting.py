"""`wait_until`: the one way a test waits — a deadline poll on a condition, never a fixed sleep.

A test that must show that something did *not* happen does not sleep and look: it waits for a later
event that proves the earlier one was handled (a sentinel message sent after it on the same channel,
or the drop counter the code increments), then asserts.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, interval_s: float = 0.02,
               message: str | Callable[[], str] = "condition") -> T:
    """Call `condition` every `interval_s` until it returns a truthy value, and return that value.

    Still falsy once `timeout_s` has passed: `AssertionError` with `message` (a callable: called then, to say
    what was still there) and the last value. An exception from `condition` propagates at once (a wait for a
    call to raise is a wait for that exception).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            raise AssertionError(f"{what} not met within {timeout_s} s; last value: {value!r}")
        time.sleep(interval_s)
