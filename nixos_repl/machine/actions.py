"""Observing machine actions: every public call of the Machine API, reported once, when it ends.

The registry hands each machine one shared list of observers; an observer is a function that
takes an :class:`Action`. Only the outermost call is reported: ``succeed`` runs ``execute``
inside, and a polling condition's commands run inside the command that triggered it, so neither
is reported on its own. "Inside" follows the call through the I/O loop and worker threads (a
context variable, which asyncio tasks and ``to_thread`` copy), so the blocking methods, the
``aio`` coroutines awaited from another loop and the driver's own actions (``start_all``) are
all seen the same way. An observer that raises is logged and never breaks the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

__all__ = ["Action", "ActionObserver", "observed", "observing"]

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)

_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("nixos_repl_action", default=False)


@dataclass
class Action:
    """One finished call: ``machine.action(*args, **kwargs)`` and how it ended."""

    machine: str | None  # None for a driver action (start_all)
    action: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    started: float  # time.time()
    duration: float = 0.0  # seconds
    result: Any = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ActionObserver = Callable[[Action], None]


def _notify(observers: list[ActionObserver], action: Action) -> None:
    for observer in list(observers):
        try:
            observer(action)
        except Exception:
            log.exception("an action observer failed")


@contextlib.contextmanager
def observing(
    observers: list[ActionObserver],
    machine: str | None,
    action: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
) -> Iterator[Action | None]:
    """Report the body as one action (unless it runs inside another); yields the Action, whose
    ``result`` the body may set, or None when nothing is reported."""
    if not observers or _inside.get():
        yield None
        return
    token = _inside.set(True)
    record = Action(machine, action, args, dict(kwargs or {}), time.time())
    tic = time.perf_counter()
    try:
        yield record
    except BaseException as e:
        record.error = e
        raise
    finally:
        _inside.reset(token)
        record.duration = time.perf_counter() - tic
        _notify(observers, record)


def observed(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Report calls of an ``AsyncMachine`` coroutine method to its machine's observers."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        machine = getattr(args[0], "_m", None)
        observers: list[ActionObserver] = getattr(machine, "observers", None) or []
        if not observers or _inside.get():
            return await fn(*args, **kwargs)
        with observing(observers, getattr(machine, "name", None), name, args[1:], kwargs) as rec:
            result = await fn(*args, **kwargs)
            if rec is not None:
                rec.result = result
            return result

    return wrapper
