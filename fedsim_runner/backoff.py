"""Waiting on a condition with exponential backoff: the one way FedSim waits (no fixed sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def delays(first: float = 0.01, factor: float = 1.6, cap: float = 1.0) -> Iterator[float]:
    """first, first·factor, … up to cap, forever."""
    delay = first
    while True:
        yield delay
        delay = min(delay * factor, cap)


def wait_until(probe: Callable[[], T], timeout: float, *, first: float = 0.01, cap: float = 1.0) -> T | None:
    """Call `probe` until it returns something truthy (returned) or `timeout` seconds pass (None).

    `probe` may raise to abort the wait (e.g. the process it waits for has exited).
    """
    deadline = time.monotonic() + timeout
    pauses = delays(first, cap=cap)
    while not (value := probe()):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(next(pauses), remaining))
    return value
