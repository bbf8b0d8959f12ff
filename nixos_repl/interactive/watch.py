"""``%watch``: a machine's screen, live in a Jupyter output, while other cells run.

``%watch vm1`` shows the screen at once as a display with a ``display_id`` and returns; a
thread of its own then takes a screenshot every ``--interval`` milliseconds and sends an
``update_display_data`` for that display only when the screen changed (the raw pixels are
compared, so an idle screen sends nothing). It stops on ``%watch --stop [NAME]``, when the
machine goes off or crashes, or when a screenshot fails; its output then says why.

The screenshots are taken on the I/O loop (QMP ``screendump``), never starting a machine that is
off; decoding, comparing and PNG encoding happen on the watch's thread, so a running command
does not wait for them and a busy cell (a long ``wait_for_text``) does not stop the updates.
The updates carry the parent header of the ``%watch`` cell (its context is copied), so a front
end routes them to that cell's output.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from IPython.core.error import UsageError
from IPython.core.magic import Magics, magics_class
from PIL import Image

from ..errors import NixosReplError, UnknownMachineError
from ..loop import run_sync
from ..machine.screenshot import Screenshot
from ..magic_table import MAGICS
from .magics import argument, magic, magic_arguments, parse_argstring, usage

if TYPE_CHECKING:
    from ..machine import Machine
    from .session import Session

__all__ = ["DEFAULT_INTERVAL_MS", "Frame", "Watch", "WatchMagics", "Watches"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 250
MIN_INTERVAL_MS = 20


class Frame:
    """One frame of a watched screen: the PNG, and a line of text for plain front ends."""

    def __init__(self, png: bytes | None, caption: str) -> None:
        self.png = png
        self.caption = caption

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        bundle = {"text/plain": self.caption}
        if self.png is not None:
            bundle["image/png"] = base64.b64encode(self.png).decode("ascii")
        return bundle

    def __repr__(self) -> str:
        return self.caption


async def _grab(machine: Machine) -> Image.Image | None:
    """A screenshot if QEMU runs, else None. Runs on the I/O loop: the state is checked and the
    screendump sent with no await between, so a watch never boots a machine that went off."""
    if not machine.state.running:
        return None
    return await machine.screen.image()


@dataclass
class Watch:
    """One machine's live screen: its thread, its display and its counts."""

    machine: Machine
    interval: float
    publish: Callable[[Frame], None]
    display_id: str = field(default_factory=lambda: f"nixos-repl-watch-{uuid.uuid4().hex}")
    frames: int = 0  # frames sent (the first display included)
    grabs: int = 0  # screenshots taken
    grab_time: float = 0.0  # seconds spent taking and comparing them
    started: float = field(default_factory=time.monotonic)
    reason: str | None = None  # why it stopped
    _last: bytes | None = None
    _png: bytes | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.machine.name

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def frame(self) -> Frame | None:
        """Take a screenshot; a new Frame if the screen changed since the last one, else None.

        Raises LookupError when the machine is not running.
        """
        started = time.perf_counter()
        image = run_sync(_grab(self.machine))
        if image is None:
            raise LookupError(f"{self.name} is {self.machine.state}")
        raw = image.tobytes()
        self.grabs += 1
        changed = raw != self._last
        self.grab_time += time.perf_counter() - started
        if not changed:
            return None
        self._last = raw
        self._png = Screenshot.from_image(image).png
        self.frames += 1
        return Frame(self._png, self.caption())

    def caption(self, note: str = "live") -> str:
        width, height = self.machine_size()
        return f"{self.name} screen {width}x{height}, {note} (frame {self.frames})"

    def machine_size(self) -> tuple[int, int]:
        if self._png is None:
            return (0, 0)
        # PNG IHDR: width and height are the first two big-endian words after the signature.
        return (int.from_bytes(self._png[16:20], "big"), int.from_bytes(self._png[20:24], "big"))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"nixos-repl-watch-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, reason: str = "stopped", wait: bool = True) -> None:
        if self.reason is None:
            self.reason = reason
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        reason = "stopped"
        while not self._stop.wait(self.interval):
            try:
                frame = self.frame()
            except LookupError as e:
                reason = f"{e}: watch stopped"
                break
            except NixosReplError as e:
                reason = f"watch stopped: {str(e).splitlines()[0]}"
                break
            except Exception as e:
                log.debug("watch of %s failed", self.name, exc_info=True)
                reason = f"watch stopped: {e}"
                break
            if frame is not None and not self._stop.is_set():
                self._send(frame)
        if self.reason is None:
            self.reason = reason
        self._send(Frame(self._png, self.caption(self.reason)))

    def _send(self, frame: Frame) -> None:
        try:
            self.publish(frame)
        except Exception:
            log.debug("could not publish a frame of %s", self.name, exc_info=True)


class Watches:
    """The running watches of a session, one per machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[str, Watch] = {}

    def add(self, watch: Watch) -> None:
        with self._lock:
            old = self._watches.pop(watch.name, None)
            self._watches[watch.name] = watch
        if old is not None:
            old.stop("replaced by a newer %watch")
        watch.start()

    def get(self, name: str) -> Watch | None:
        with self._lock:
            watch = self._watches.get(name)
        return watch if watch is not None and watch.running else None

    def running(self) -> list[Watch]:
        with self._lock:
            return [w for w in self._watches.values() if w.running]

    def stop(self, name: str | None = None) -> list[str]:
        """Stop one machine's watch, or all; the names of those that were running."""
        with self._lock:
            names = [name] if name is not None else list(self._watches)
            stopping = [w for n in names if (w := self._watches.pop(n, None)) is not None]
        stopped = [w.name for w in stopping if w.running]
        for watch in stopping:
            watch.stop()
        return stopped


def _interval(value: str) -> int:
    import argparse

    try:
        ms = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of milliseconds: {value!r}") from None
    if ms < MIN_INTERVAL_MS:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INTERVAL_MS} ms, not {ms}")
    return ms


def _jupyter_publisher(display_id: str) -> tuple[Callable[[Frame], None], Callable[[Frame], None]]:
    """``show`` (a new display in the running cell) and ``update`` (from any thread), both in
    the cell's context, so the outputs carry that cell's parent header."""
    from IPython import display as ipd

    context = contextvars.copy_context()
    lock = threading.Lock()
    show: Callable[..., Any] = ipd.display
    update: Callable[..., Any] = ipd.update_display

    def publish_update(frame: Frame) -> None:
        with lock:  # one thread at a time may enter the context
            context.run(update, frame, display_id=display_id)

    def publish_show(frame: Frame) -> None:
        show(frame, display_id=display_id)

    return publish_show, publish_update


@magics_class
class WatchMagics(Magics):
    """``%watch``: live screens in Jupyter."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session
        self.watches = Watches()

    def _machine(self, name: str) -> Machine:
        try:
            machine = self.session.machine(name)
        except UnknownMachineError as e:
            raise UsageError(str(e)) from None
        refusal = MAGICS["watch"].refusal(machine)  # a container has no screen
        if refusal is not None:
            raise UsageError(refusal)
        return cast("Machine", machine)

    @magic_arguments()
    @argument("name", nargs="?", metavar="NAME", help="the machine")
    @argument(
        "--interval",
        type=_interval,
        default=DEFAULT_INTERVAL_MS,
        metavar="MS",
        help=f"milliseconds between screenshots (default {DEFAULT_INTERVAL_MS})",
    )
    @argument("--stop", action="store_true", help="stop NAME's live screen (all without NAME)")
    @magic("watch")
    def watch(self, line: str) -> Any:
        """Show a machine's screen live in the cell's output (Jupyter), and return at once.

        A screenshot is taken every MS milliseconds; a frame is sent only when the screen
        changed, so an idle screen costs a screenshot per interval and no traffic. The watch
        stops with ``%watch --stop [NAME]``, by itself when the machine goes off, or when a
        newer ``%watch NAME`` replaces it. ``%watch`` alone lists the running watches.
        """
        try:
            args = parse_argstring(self.watch, line)
        except (UsageError, ValueError) as e:
            raise UsageError(f"{e}\n{usage(self.watch)}") from None
        if args.stop:
            if args.name is not None:
                self._machine(args.name)
                if not self.watches.stop(args.name):
                    raise UsageError(f"{args.name} is not being watched")
                return None
            self.watches.stop()
            return None
        if args.name is None:
            running = self.watches.running()
            if not running:
                return _Text("no screen is being watched (start one with %watch NAME)")
            return _Text(
                "\n".join(
                    f"{w.name}: every {w.interval * 1000:.0f} ms, {w.frames} frames "
                    f"from {w.grabs} screenshots in {time.monotonic() - w.started:.0f} s"
                    for w in running
                )
            )
        machine = self._machine(args.name)
        if getattr(self.shell, "kernel", None) is None:
            raise UsageError(
                "%watch shows a live screen in Jupyter only (a notebook on the nixos-repl "
                f"kernel); here use %screenshot {machine.name}"
            )
        if not machine.state.running:
            raise UsageError(
                f"{machine.name} is {machine.state}: there is no screen to watch; "
                f"start it with %start {machine.name}"
            )
        watch = Watch(machine, args.interval / 1000, publish=lambda _: None)
        show, update = _jupyter_publisher(watch.display_id)
        watch.publish = update
        try:
            first = watch.frame()
        except LookupError:
            raise UsageError(f"{machine.name} went off: there is no screen to watch") from None
        assert first is not None
        show(first)
        self.watches.add(watch)
        return None


class _Text(str):
    __slots__ = ()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))
