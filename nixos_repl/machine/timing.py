"""Durations, nixpkgs' retry semantics and its nested log steps, shared by the machine's parts."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping

from ..errors import RequestedAssertionFailed

__all__ = [
    "DEFAULT_TIMEOUT",
    "Duration",
    "backoff",
    "nested",
    "poll_until",
    "seconds",
    "timed_out",
]

Duration = dt.timedelta | int | float

# nixpkgs' default for every wait and for a command's guest-side limit.
DEFAULT_TIMEOUT = dt.timedelta(minutes=15)


@contextlib.contextmanager
def nested(log: logging.Logger, msg: str, attrs: Mapping[str, str] | None = None) -> Iterator[None]:
    """Log ``msg``, run the body, then ``(finished: msg, in X.XX seconds)`` (nixpkgs' ``nested``).

    Both records carry ``extra`` for structured handlers: ``step`` (the message), ``phase``
    (``"start"`` or ``"end"``), at the end ``elapsed`` seconds, and ``attrs`` (nixpkgs' XML log
    attributes, e.g. ``{"image": "shot.png"}``) at the start.
    """
    log.info("%s", msg, extra={"step": msg, "phase": "start", "attrs": dict(attrs or {})})
    start = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - start
        log.info(
            "(finished: %s, in %.2f seconds)",
            msg,
            elapsed,
            extra={"step": msg, "phase": "end", "elapsed": elapsed},
        )


def seconds(value: Duration | None) -> float | None:
    """A duration as seconds: timedelta or a bare number; bool is refused, as in nixpkgs."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a duration must be a datetime.timedelta or a number of seconds, not bool")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"a duration must be a datetime.timedelta or seconds, not {value!r}")


def backoff(timeout: float, first_delay: float = 0.05) -> Iterator[float]:
    """Pauses between the tries of nixpkgs' ``retry``, until ``timeout`` seconds have passed.

    The pause starts short and doubles up to 1 s: a probe costs milliseconds here, so a state
    change is seen quickly without flooding the guest. After the last pause comes one last try.
    """
    start, delay = time.monotonic(), first_delay
    while (remaining := timeout - (time.monotonic() - start)) > 0:
        yield min(delay, remaining)
        delay = min(delay * 2, 1.0)


def timed_out(start: float, timeout: float, detail: str = "") -> RequestedAssertionFailed:
    """nixpkgs' retry failure, ``action timed out after X.XX seconds (timeout=N)``."""
    elapsed = time.monotonic() - start
    return RequestedAssertionFailed(
        f"action timed out after {elapsed:.2f} seconds (timeout={timeout}){detail}"
    )


async def poll_until(
    check: Callable[[bool], Awaitable[bool]], timeout: float, start: float | None = None
) -> None:
    """nixpkgs' ``retry`` for machine waits: try until the deadline, then one last try.

    ``start`` (a ``time.monotonic()`` value) is when the wait began, if before this call: the
    deadline is ``start + timeout``, and the timeout message counts from it.
    """
    began = time.monotonic() if start is None else start
    remaining = max(0.0, timeout - (time.monotonic() - began))
    for pause in backoff(remaining):
        if await check(False):
            return
        await asyncio.sleep(pause)
    if not await check(True):
        raise timed_out(began, timeout)
