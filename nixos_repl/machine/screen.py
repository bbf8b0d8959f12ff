"""Screen, keyboard and QEMU-side controls of a machine (QMP and HMP backends).

``ScreenMixin`` is one of the parts ``Machine`` is composed from. The API is nixpkgs'
(``screenshot``, ``send_key``, ``send_chars``, ``get_screen_text``, ``wait_for_text``,
``forward_port``, ``block``, ``reboot``, the TTY helpers, ``wait_for_qmp_event``); where nixpkgs
goes through the human monitor, this goes through QMP when that is faster or reports errors:

* ``screenshot`` asks QEMU for a PPM over QMP ``screendump`` and converts it with Pillow (no
  ``pnmtopng`` fork). ``screenshot()`` without a name returns the :class:`Screenshot` unsaved,
  for inline display.
* ``send_key`` uses QMP ``send-key`` with a 10 ms hold time (HMP ``sendkey`` holds 100 ms), and
  an unknown key name raises ``ValueError`` instead of being ignored.
* ``wait_for_text`` reads screenshots as the OCR passes finish and stops at the first match; at
  the deadline it cancels the running passes, so it ends within its timeout plus one raw pass.
* ``forward_port`` binds the host side to 127.0.0.1 (nixpkgs listens on every interface), and
  HMP errors from ``forward_port``/``block``/``unblock`` raise ``MachineError``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import io
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from PIL import Image

from ..errors import MachineError, QMPAPIError
from ..loop import on_io_loop
from . import ocr
from .keys import CHAR_TO_KEY, key_to_qmp
from .screenshot import Screenshot
from .timing import Duration, poll_until, seconds, timed_out

if TYPE_CHECKING:
    from .monitor import Monitor
    from .process import QemuProcess
    from .qmp import QMPSession

__all__ = ["ScreenMixin", "screenshot_path"]

T = TypeVar("T")

# QMP ``send-key`` hold time: how long each key stays pressed (HMP ``sendkey`` uses 100 ms).
KEY_HOLD_MS: Final = 10
# The first VLAN NIC: the second virtio-net device (the first one is user networking).
VLAN_NIC: Final = "virtio-net-pci.1"
# Within one wait_for_text attempt, fresh screenshots this long after its start.
OCR_RESCREEN: Final = (1.0, 2.0, 4.0)


def screenshot_path(filename: str, out_dir: Path) -> str:
    """nixpkgs' naming rules: add ``.png`` if the name has no ``.``; put it in ``out_dir`` if
    it has no ``/``."""
    if "." not in filename:
        filename += ".png"
    if "/" not in filename:
        filename = os.path.join(out_dir, filename)
    return filename


def _load_ppm(ppm: Path) -> Image.Image:
    data = ppm.read_bytes()
    image = Image.open(io.BytesIO(data))
    if image.format != "PPM":
        raise MachineError(f"screendump wrote {image.format or 'unknown data'}, not a PPM image")
    image.load()
    return image


def _convert(ppm: Path, target: str | None) -> Screenshot:
    """Decode QEMU's PPM, encode the PNG, and save it to ``target`` if given (one thread hop)."""
    shot = Screenshot.from_image(_load_ppm(ppm), target)
    if target is not None:
        shot.save(target)
    return shot


def _hmp_output(reply: str) -> str:
    """What an HMP command printed: the reply without the echoed command line and the prompt."""
    _, _, rest = reply.partition("\r\n")
    return rest.removesuffix("(qemu) ").strip()


def _port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(
            f"forward_port(): {what} must be a TCP port number (1-65535), not {value!r}"
        )
    return value


def _stdin_reader() -> Callable[[], tuple[str, bool]]:
    """A reader of what is typed on stdin: returns (text, at EOF), as soon as input arrives."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text-only stdin (an embedding front end)

        def read_text() -> tuple[str, bool]:
            text = sys.stdin.read(1)
            return text, not text

        return read_text
    read1 = getattr(buffer, "read1", None)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read_bytes() -> tuple[str, bool]:
        data = read1(4096) if read1 is not None else buffer.read(1)
        return decoder.decode(data, final=not data), not data

    return read_bytes


class ScreenMixin:
    """What a person sees and types: screenshots, keys, OCR, TTYs, port forwards, links."""

    # Provided by Machine.
    name: str
    log: logging.Logger
    out_dir: Path
    state_dir: Path
    qmp_client: QMPSession | None
    monitor: Monitor | None
    allow_reboot: bool
    connected: bool
    booted: bool
    process: QemuProcess | None
    _expect_exit: bool
    _reboot_requested: bool

    if TYPE_CHECKING:

        async def astart(self, allow_reboot: bool = False) -> None: ...
        def _run(self, coro: Coroutine[Any, Any, T], checks: bool = True) -> T: ...
        def nested(self, msg: str) -> contextlib.AbstractContextManager[None]: ...
        async def _guard(self, coro: Awaitable[T]) -> T: ...
        async def _explain_death(self) -> None: ...
        def _check_crashed(self) -> None: ...
        def expect_new_boot(self) -> None: ...
        async def aexecute(
            self,
            command: str,
            check_return: bool = True,
            check_output: bool = True,
            timeout: Duration | None = ...,
        ) -> tuple[int, str]: ...
        def send_console(self, chars: str) -> None: ...
        async def asend_monitor_command(self, command: str) -> str: ...

    # -- QMP -----------------------------------------------------------------------------------

    async def _ensure_running(self) -> QMPSession:
        """Start QEMU if needed (not after a crash: that raises its report) and return QMP."""
        self._check_crashed()
        await self.astart(self.allow_reboot)
        if self.qmp_client is None:
            raise MachineError(f"{self.name}: QMP is not connected; call {self.name}.start()")
        return self.qmp_client

    async def _qmp(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a QMP command, failing with the crash report if QEMU dies meanwhile."""
        client = await self._ensure_running()
        try:
            return await self._guard(client.aexecute(cmd, args))
        except ConnectionError:
            await self._explain_death()
            raise

    @on_io_loop
    async def await_for_qmp_event(
        self,
        event_filter: Callable[[dict[str, Any]], bool],
        timeout: Duration = dt.timedelta(minutes=10),
    ) -> dict[str, Any]:
        """The first QMP event ``event_filter`` accepts; the others are discarded (nixpkgs).

        Events that arrived since QEMU started and were not consumed yet count. Raises
        ``TimeoutError`` after ``timeout``, and ``ConnectionError`` (or the crash report) when
        QEMU exits first.
        """
        client = self.qmp_client
        if client is None:
            raise RuntimeError("QMP API is not ready yet, is the VM ready?")
        limit = seconds(timeout)
        assert limit is not None
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching QMP event from {self.name} within {limit} s")
            try:
                event = await client.await_event(remaining)
            except ConnectionError:
                await self._explain_death()
                raise
            except TimeoutError:
                raise TimeoutError(
                    f"no matching QMP event from {self.name} within {limit} s"
                ) from None
            if event_filter(event):
                return event

    def wait_for_qmp_event(
        self,
        event_filter: Callable[[dict[str, Any]], bool],
        timeout: Duration = dt.timedelta(minutes=10),
    ) -> dict[str, Any]:
        return self._run(self.await_for_qmp_event(event_filter, timeout))

    # -- screenshots ---------------------------------------------------------------------------

    async def _dump(self, convert: Callable[[Path], T]) -> T:
        """QMP ``screendump`` to a PPM in the state dir, then ``convert(ppm)`` in a thread."""
        client = await self._ensure_running()
        ppm = self.state_dir / f"screendump-{secrets.token_hex(6)}.ppm"
        # Shielded: if the caller is cancelled meanwhile, QEMU still writes the file, which is
        # then removed when the command completes.
        dump = asyncio.ensure_future(
            self._guard(client.aexecute("screendump", {"filename": str(ppm)}))
        )
        try:
            await asyncio.shield(dump)
        except asyncio.CancelledError:
            dump.add_done_callback(lambda f: _discard(f, ppm))
            raise
        except ConnectionError:
            _unlink(ppm)
            await self._explain_death()
            raise
        except QMPAPIError as e:
            _unlink(ppm)
            raise MachineError(
                f"{self.name}: QEMU could not take a screenshot: {e.description} "
                "(does the machine have a display device?)"
            ) from e
        except BaseException:
            _unlink(ppm)
            raise
        try:
            return await asyncio.to_thread(convert, ppm)
        finally:
            _unlink(ppm)

    async def _screen_image(self) -> Image.Image:
        """A fresh screenshot as a Pillow image (for OCR: no PNG encoding)."""
        return await self._dump(_load_ppm)

    @on_io_loop
    async def ascreenshot(self, filename: str | None = None) -> Screenshot:
        """Take a screenshot; with ``filename``, also save it as PNG (nixpkgs' naming rules).

        A name without ``.`` gets ``.png``; a name without ``/`` goes to the output directory.
        Returns the :class:`Screenshot` (it displays inline in IPython and Jupyter).
        """
        if filename is None:
            return await self._dump(lambda ppm: _convert(ppm, None))
        path = screenshot_path(filename, self.out_dir)
        with self.nested(f"making screenshot {path}"):
            return await self._dump(lambda ppm: _convert(ppm, path))

    def screenshot(self, filename: str | None = None) -> Screenshot:
        return self._run(self.ascreenshot(filename))

    # -- keys ----------------------------------------------------------------------------------

    async def _press(self, keys: list[dict[str, object]], delay: float | None) -> None:
        await self._qmp("send-key", {"keys": keys, "hold-time": KEY_HOLD_MS})
        if delay:
            await asyncio.sleep(delay)

    @on_io_loop
    async def asend_key(
        self,
        key: str,
        delay: Duration | None = dt.timedelta(milliseconds=10),
        log: bool | None = True,
    ) -> None:
        """Press ``key`` (a character or a QEMU key spec like ``ctrl-alt-delete``), then wait
        ``delay``. An unknown key raises ``ValueError`` naming it."""
        wait = seconds(delay)
        keys = key_to_qmp(key)
        if log:
            with self.nested(f"sending key {CHAR_TO_KEY.get(key, key)!r}"):
                await self._press(keys, wait)
        else:
            await self._press(keys, wait)

    def send_key(
        self,
        key: str,
        delay: Duration | None = dt.timedelta(milliseconds=10),
        log: bool | None = True,
    ) -> None:
        self._run(self.asend_key(key, delay, log))

    @on_io_loop
    async def asend_chars(
        self, chars: str, delay: Duration | None = dt.timedelta(milliseconds=10)
    ) -> None:
        """Type ``chars`` one key at a time (``\\n`` is Enter, ``\\t`` is Tab).

        Every character is checked before the first is typed: a character with no key
        raises ``ValueError`` and nothing is sent.
        """
        wait = seconds(delay)
        sequence = []
        for i, char in enumerate(chars):
            try:
                sequence.append(key_to_qmp(char))
            except ValueError as e:
                raise ValueError(
                    f"send_chars(): cannot type {char!r} (position {i} of {chars!r}), "
                    f"nothing was sent: {e}"
                ) from None
        with self.nested(f"sending keys {chars!r}"):
            for keys in sequence:
                await self._press(keys, wait)

    def send_chars(
        self, chars: str, delay: Duration | None = dt.timedelta(milliseconds=10)
    ) -> None:
        self._run(self.asend_chars(chars, delay))

    # -- OCR -----------------------------------------------------------------------------------

    @on_io_loop
    async def aget_screen_text(self) -> str:
        """The text tesseract reads on a fresh screenshot, unprocessed."""
        return await ocr.ocr(await self._screen_image())

    def get_screen_text(self) -> str:
        return self._run(self.aget_screen_text())

    @on_io_loop
    async def aget_screen_text_variants(self) -> list[str]:
        """Texts read on a fresh screenshot: raw, and two preprocessed variants."""
        return await ocr.ocr_variants(await self._screen_image())

    def get_screen_text_variants(self) -> list[str]:
        return self._run(self.aget_screen_text_variants())

    async def _ocr_attempt(
        self, pattern: re.Pattern[str], delays: tuple[float, ...], seen: set[bytes]
    ) -> bool:
        async with ocr.iter_ocr(self._screen_image, True, delays, seen) as texts:
            async for text in texts:
                if pattern.search(text):
                    return True
        return False

    @on_io_loop
    async def await_for_text(
        self, regex: str, timeout: Duration = dt.timedelta(minutes=15)
    ) -> None:
        """Wait until OCR of the screen matches ``regex`` (``re.search``).

        Each attempt takes a screenshot, then others after 1, 2 and 4 s, and reads each one not
        read before (raw and two preprocessed variants, as the passes finish); it stops at the
        first match. At the deadline the running passes are killed, and one last raw pass reads
        a fresh screenshot.
        """
        limit = seconds(timeout)
        assert limit is not None
        pattern = re.compile(regex)
        with self.nested(f"waiting for {regex} to appear on screen"):
            start = time.monotonic()
            seen: set[bytes] = set()  # images read already, over all attempts
            while (remaining := limit - (time.monotonic() - start)) > 0:
                delays = tuple(d for d in OCR_RESCREEN if d < remaining)
                deadline = asyncio.timeout(remaining)
                attempt_start = time.monotonic()
                try:
                    async with deadline:
                        if await self._ocr_attempt(pattern, delays, seen):
                            return
                        # At most one attempt a second (nixpkgs' retry cadence).
                        await asyncio.sleep(max(0.0, attempt_start + 1.0 - time.monotonic()))
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    break
            texts = [await self.aget_screen_text()]
            if any(pattern.search(text) for text in texts):
                return
            self.log.info("Last OCR attempt failed. Text was: %s", texts)
            raise timed_out(start, limit)

    def wait_for_text(self, regex: str, timeout: Duration = dt.timedelta(minutes=15)) -> None:
        self._run(self.await_for_text(regex, timeout))

    # -- TTYs and the serial console -----------------------------------------------------------

    @on_io_loop
    async def aget_tty_text(self, tty: str) -> str:
        """The text on virtual terminal ``tty`` (``/dev/vcs<tty>``), folded to its width."""
        _, output = await self.aexecute(
            f"fold -w$(stty -F /dev/tty{tty} size | awk '{{print $2}}') /dev/vcs{tty}"
        )
        return output

    def get_tty_text(self, tty: str) -> str:
        return self._run(self.aget_tty_text(tty))

    @on_io_loop
    async def await_until_tty_matches(
        self, tty: str, regexp: str, timeout: Duration = dt.timedelta(minutes=15)
    ) -> None:
        """Wait until ``regexp`` matches the text on virtual terminal ``tty``."""
        limit = seconds(timeout)
        assert limit is not None
        matcher = re.compile(regexp)

        async def tty_matches(last_try: bool) -> bool:
            text = await self.aget_tty_text(tty)
            if last_try:
                self.log.info(
                    "Last chance to match /%s/ on TTY%s, which currently contains: %s",
                    regexp,
                    tty,
                    text,
                )
            return len(matcher.findall(text)) > 0

        with self.nested(f"waiting for {regexp} to appear on tty {tty}"):
            await poll_until(tty_matches, limit)

    def wait_until_tty_matches(
        self, tty: str, regexp: str, timeout: Duration = dt.timedelta(minutes=15)
    ) -> None:
        self._run(self.await_until_tty_matches(tty, regexp, timeout))

    @on_io_loop
    async def adump_tty_contents(self, tty: str) -> None:
        """Send the text of virtual terminal ``tty`` to the guest's journal (``systemd-cat``)."""
        await self.aexecute(f"fold -w 80 /dev/vcs{tty} | systemd-cat")

    def dump_tty_contents(self, tty: str) -> None:
        self._run(self.adump_tty_contents(tty))

    def console_interact(self) -> None:
        """Forward this terminal's input to the guest's serial console until EOF or Ctrl-C.

        What the guest writes there goes to the console log (and the terminal, unless serial
        output is turned off). There is no prompt.
        """
        self.log.info("Terminal is ready (there is no prompt):")
        read = _stdin_reader()
        try:
            while True:
                text, eof = read()
                if text:
                    self.send_console(text)
                if eof:
                    self.log.info("Closing connection to the console")
                    return
        except KeyboardInterrupt:
            return

    # -- network -------------------------------------------------------------------------------

    async def _hmp_checked(self, command: str, what: str) -> None:
        """Run an HMP command that prints nothing on success; raise its message otherwise."""
        self._check_crashed()
        reply = await self.asend_monitor_command(command)
        output = _hmp_output(reply)
        if output:
            raise MachineError(f"{self.name}: {what} failed: {output} (HMP `{command}`)")

    @on_io_loop
    async def aforward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        """Forward TCP ``127.0.0.1:host_port`` on the host to ``guest_port`` on the guest's
        user-networking interface (eth0)."""
        host_port = _port(host_port, "host_port")
        guest_port = _port(guest_port, "guest_port")
        await self._hmp_checked(
            f"hostfwd_add tcp:127.0.0.1:{host_port}-:{guest_port}",
            f"forwarding host port {host_port} to guest port {guest_port} "
            "(is the host port already in use?)",
        )

    def forward_port(self, host_port: int = 8080, guest_port: int = 80) -> None:
        self._run(self.aforward_port(host_port, guest_port))

    @on_io_loop
    async def ablock(self) -> None:
        """Take the first VLAN interface's link down, as if its cable were unplugged."""
        await self._hmp_checked(
            f"set_link {VLAN_NIC} off", "block() (it needs a VLAN network interface)"
        )

    def block(self) -> None:
        self._run(self.ablock())

    @on_io_loop
    async def aunblock(self) -> None:
        """Bring the first VLAN interface's link back up."""
        await self._hmp_checked(
            f"set_link {VLAN_NIC} on", "unblock() (it needs a VLAN network interface)"
        )

    def unblock(self) -> None:
        self._run(self.aunblock())

    # -- reboot --------------------------------------------------------------------------------

    @on_io_loop
    async def areboot(self) -> None:
        """Press Ctrl-Alt-Delete; the next command waits for the guest to come back.

        Useful when started with ``start(allow_reboot=True)``; otherwise QEMU exits on the reset
        and the machine is off (not crashed).
        """
        await self._ensure_running()
        if self.allow_reboot:
            self._reboot_requested = True
        else:
            self._expect_exit = True
        await self.asend_key("ctrl-alt-delete")
        if self.allow_reboot:
            self.expect_new_boot()
        else:
            self.connected = False

    def reboot(self) -> None:
        self._run(self.areboot())


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _discard(done: asyncio.Future[Any], path: Path) -> None:
    """Done-callback of an abandoned screendump: remove its file, swallow its outcome."""
    if not done.cancelled():
        done.exception()
    _unlink(path)
