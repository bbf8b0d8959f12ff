"""``test_driver.duration``: durations of the API (a timedelta, or a number of seconds)."""

import datetime as dt

from nixos_repl.machine.timing import Duration, seconds

__all__ = ["Duration", "as_seconds", "as_timedelta"]


def as_seconds(duration: Duration) -> float:
    """``duration`` in seconds (a bool is refused)."""
    value = seconds(duration)
    if value is None:
        raise TypeError("expected a duration, got None")
    return value


def as_timedelta(duration: Duration) -> dt.timedelta:
    """``duration`` as a timedelta (a bare number is seconds)."""
    return (
        duration
        if isinstance(duration, dt.timedelta)
        else dt.timedelta(seconds=as_seconds(duration))
    )
