"""The one background asyncio loop that owns all I/O, and the sync <-> async bridge.

Public machine methods are synchronous like nixpkgs'. They submit a coroutine to this loop and
wait for it. The wait can be cut by KeyboardInterrupt (Ctrl-C in a REPL, a Jupyter interrupt): the
coroutine is then cancelled, and its cancellation path, not the caller, restores protocol sync.
Because Jupyter's and IPython's own loops never run our I/O, there is no nested-loop trouble.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

__all__ = ["get_loop", "on_io_loop", "run_sync", "spawn"]

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger(__name__)

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
# How long an interrupted call waits for its coroutine's cleanup before giving control back.
CANCEL_GRACE = 5.0


def get_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use in a daemon thread named ``nixos-repl-io``."""
    global _loop, _thread
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="nixos-repl-io", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the shared loop and wait for its result.

    A KeyboardInterrupt while waiting cancels the coroutine and waits (bounded) until its
    cancellation path has finished, then re-raises: the caller sees the interrupt, and the
    channel is in sync before the next call. The wait is a plain lock acquire: unlike
    ``Condition.wait`` it has no re-acquire step an interrupt can wedge.
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError(
            "run_sync() called from the I/O loop thread: await the coroutine instead"
        )
    loop = get_loop()
    done = threading.Lock()
    done.acquire()
    outcome: list[tuple[bool, Any]] = []
    task: list[asyncio.Future[T]] = []
    cancelled = threading.Event()

    async def runner() -> None:
        # Never cancelled itself, so it always reports, after ``coro``'s own cleanup.
        try:
            task.append(asyncio.ensure_future(coro))
            if cancelled.is_set():
                task[0].cancel()
            outcome.append((True, await task[0]))
        except BaseException as e:
            outcome.append((False, e))
        finally:
            done.release()

    def cancel() -> None:
        cancelled.set()
        if task:
            task[0].cancel()

    asyncio.run_coroutine_threadsafe(runner(), loop)
    try:
        if not done.acquire(timeout=-1 if timeout is None else timeout):
            loop.call_soon_threadsafe(cancel)
            raise TimeoutError(f"operation did not finish within {timeout} seconds")
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(cancel)
        try:
            if not done.acquire(timeout=CANCEL_GRACE):
                log.warning("the interrupted call is still cleaning up; not waiting for it")
        except KeyboardInterrupt:
            log.warning("interrupted again: not waiting for the command's cleanup")
        raise
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


def on_io_loop(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Make an async method awaitable from any event loop (IPython's, Jupyter's, asyncio.run's).

    On the shared I/O loop the coroutine runs as is; awaited from another loop it is handed to
    the I/O loop and awaited through a future, so cancelling the caller cancels it there too.
    """

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        coro = fn(*args, **kwargs)
        if in_loop_thread():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, get_loop()))

    return wrapper


def spawn(coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
    """Schedule ``coro`` on the shared loop without waiting for it."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())
