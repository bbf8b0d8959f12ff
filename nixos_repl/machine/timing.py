"""Durations, nixpkgs' retry semantics and its nested log steps, shared by the machine's parts."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping

from ..errors import RequestedAssertionFailed

__all__ = [
    "DEFAULT_TIMEOUT",
    "LAST_TRY_GRACE",
    "Duration",
    "attempt_bound",
    "attempt_expired",
    "backoff",
    "bounded",
    "nested",
    "poll_until",
    "seconds",
    "timed_out",
]

Duration = dt.timedelta | int | float

# nixpkgs' default for every wait and for a command's guest-side limit.
DEFAULT_TIMEOUT = dt.timedelta(minutes=15)
# How long after a wait's deadline its last try may run before it is cut: a wait ends within its
# timeout plus this (and the time to kill the try).
LAST_TRY_GRACE = 0.5


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


# The monotonic time at which the current attempt of a retry loop ends, if it has a bound.
_attempt_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "attempt_deadline", default=None
)


@contextlib.contextmanager
def attempt_bound(limit: float | None) -> Iterator[None]:
    """Within the block, guest commands are cut (status 124) once ``limit`` seconds have passed.

    This is ``attempt_timeout`` of nixpkgs' in-flight retry change: one blocking probe cannot
    eat a wait's whole budget. The bound follows the context, into the I/O loop as well.
    """
    if limit is None:
        yield
        return
    token = _attempt_deadline.set(time.monotonic() + limit)
    try:
        yield
    finally:
        _attempt_deadline.reset(token)


def bounded(timeout: float | None) -> float | None:
    """A command's ``timeout`` capped by the enclosing attempt's bound, if any."""
    deadline = _attempt_deadline.get()
    if deadline is None:
        return timeout
    left = max(deadline - time.monotonic(), 0.01)
    return left if timeout is None else min(timeout, left)


def attempt_expired() -> bool:
    """Whether the enclosing attempt's bound has passed (its commands were cut)."""
    deadline = _attempt_deadline.get()
    return deadline is not None and time.monotonic() >= deadline


async def poll_until(
    check: Callable[[bool], Awaitable[bool]],
    timeout: float,
    attempt_timeout: float | None = None,
    start: float | None = None,
) -> None:
    """nixpkgs' ``retry`` for machine waits: try until the deadline, then one last try.

    With ``attempt_timeout``, guest commands of each try are cut after that many seconds; and no
    try's guest commands run past the deadline plus ``LAST_TRY_GRACE`` (the last try, made after
    the deadline, gets that grace at least).
    ``start`` (a ``time.monotonic()`` value) is when the wait began, if before this call (a
    guest-side wait came first): the deadline is ``start + timeout``, and the timeout message
    counts from it.
    """
    began = time.monotonic() if start is None else start
    end = began + timeout + LAST_TRY_GRACE

    async def attempt(last_try: bool) -> bool:
        # The last try, made after the deadline, gets the grace at least.
        bound = max(end - time.monotonic(), LAST_TRY_GRACE)
        with attempt_bound(bound if attempt_timeout is None else min(bound, attempt_timeout)):
            return await check(last_try)

    for pause in backoff(max(0.0, timeout - (time.monotonic() - began))):
        if await attempt(False):
            return
        await asyncio.sleep(pause)
    if not await attempt(True):
        raise timed_out(began, timeout)
