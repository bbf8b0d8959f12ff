"""The QMP session: qemu.qmp's async client on the shared loop, with nixpkgs' QMPSession surface.

nixpkgs compatibility: ``send(cmd, args)`` returns the response message (``{"return": ...}``),
errors raise ``QMPAPIError`` with ``class_name``/``description``/``transaction_id``, and
``wait_for_event(timeout)`` returns the next event. Unlike nixpkgs, a closed connection (QEMU died)
raises ``ConnectionError`` at once instead of spinning for ever.

Every event is also handed synchronously, in arrival order, to an ``on_event`` callback: the machine
uses it for crash detection (SHUTDOWN/RESET) and the shell channel for stdout-close detection
(VSERPORT_CHANGE).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message

from ..errors import QMPAPIError
from ..loop import run_sync

__all__ = ["QMPSession"]

Event = dict[str, Any]
# Events kept for wait_for_event()/events() when nobody is waiting (older ones are dropped).
EVENT_BACKLOG = 1000


# Devices nixos-repl adds to a machine carry ids with this prefix; their events are not the user's.
INTERNAL_PREFIX = "nixos-repl-"


def _internal(event: Event) -> bool:
    data = event.get("data")
    return isinstance(data, dict) and str(data.get("id", "")).startswith(INTERNAL_PREFIX)


class _Client(QMPClient):
    """A QMPClient that dispatches events to one callback instead of unbounded queues."""

    def __init__(self, name: str, on_event: Callable[[Event], None]) -> None:
        super().__init__(name)
        self._on_event = on_event

    async def _event_dispatch(self, msg: Message) -> None:
        self._on_event(dict(msg))


class QMPSession:
    """A QMP connection to one QEMU process."""

    def __init__(self, name: str, on_event: Callable[[Event], None] | None = None) -> None:
        self.name = name
        self.log = logging.getLogger(f"nixos_repl.machine.{name}.qmp")
        self._callback = on_event
        self._client = _Client(name, self._dispatch)
        self._events: collections.deque[Event] = collections.deque(maxlen=EVENT_BACKLOG)
        self._event_arrived = asyncio.Event()
        self._closed = False
        self._disconnecting = False
        self._jobs: dict[str, asyncio.Future[None]] = {}  # job id -> concluded
        self._closed_event = asyncio.Event()

    def _dispatch(self, event: Event) -> None:
        self.log.debug("event %s", event)
        if event.get("event") == "JOB_STATUS_CHANGE":
            data = event.get("data") or {}
            job = self._jobs.get(str(data.get("id")))
            if job is not None and data.get("status") == "concluded" and not job.done():
                job.set_result(None)
        if not _internal(event):
            self._events.append(event)
            self._event_arrived.set()
        if self._callback is not None:
            self._callback(event)

    async def connect(self, path: Path) -> None:
        await self._client.connect(str(path))

    @property
    def connected(self) -> bool:
        return not self._closed and self._client.runstate.name == "RUNNING"

    async def aexecute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a QMP command; returns the response message, ``{"return": ...}``."""
        if not self.connected:
            raise ConnectionError(f"QMP connection to {self.name} is closed (QEMU is not running)")
        try:
            result = await self._client.execute(cmd, args)
        except ExecuteError as e:
            raise QMPAPIError(
                {"error": {"class": e.error_class, "desc": str(e)}, "id": None}
            ) from None
        except (QMPError, EOFError, OSError) as e:
            raise ConnectionError(f"QMP connection to {self.name} closed: {e}") from e
        return {"return": result}

    async def run_job(self, cmd: str, args: dict[str, Any], job_id: str) -> None:
        """Run a QMP job command (``snapshot-save``...) to its end, then dismiss it.

        The end is QEMU's ``JOB_STATUS_CHANGE`` event, not a poll. A job that failed raises
        ``QMPAPIError`` with QEMU's reason.
        """
        concluded = asyncio.get_running_loop().create_future()
        self._jobs[job_id] = concluded
        try:
            await self.aexecute(cmd, {"job-id": job_id, **args})
            closed = asyncio.ensure_future(self._closed_event.wait())
            try:
                await asyncio.wait({concluded, closed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
            if not concluded.done():
                raise ConnectionError(f"QMP connection to {self.name} closed during {cmd}")
            jobs = (await self.aexecute("query-jobs"))["return"]
            error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
            await self.aexecute("job-dismiss", {"id": job_id})
        finally:
            del self._jobs[job_id]
        if error:
            raise QMPAPIError({"error": {"class": "GenericError", "desc": error}, "id": None})

    def send(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """nixpkgs' ``QMPSession.send``: run a command and return the response message."""
        return run_sync(self.aexecute(cmd, args))

    async def await_event(self, timeout: float | None) -> Event:
        """The next event (backlog first); TimeoutError after ``timeout`` seconds."""

        async def next_event() -> Event:
            while not self._events:
                if self._closed:
                    raise ConnectionError(f"QMP connection to {self.name} closed")
                self._event_arrived.clear()
                await self._event_arrived.wait()
            return self._events.popleft()

        try:
            return await asyncio.wait_for(next_event(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no QMP event from {self.name} within {timeout} s") from None

    def wait_for_event(self, timeout: dt.timedelta | float = dt.timedelta(seconds=10)) -> Event:
        seconds = timeout.total_seconds() if isinstance(timeout, dt.timedelta) else timeout
        return run_sync(self.await_event(seconds))

    def events(self) -> list[Event]:
        """Drain and return the pending events."""
        out = list(self._events)
        self._events.clear()
        return out

    def mark_closed(self) -> None:
        """Called when QEMU exits: every waiter gets ConnectionError instead of hanging."""
        self._closed = True
        self._closed_event.set()
        self._event_arrived.set()

    async def close(self) -> None:
        if self._disconnecting:
            return
        self._disconnecting = True
        self.mark_closed()
        try:
            await self._client.disconnect()
        except (QMPError, OSError, EOFError) as e:
            self.log.debug("disconnect: %s", e)
