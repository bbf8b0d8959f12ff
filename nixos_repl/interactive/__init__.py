"""Interactive front ends: the IPython extension, the terminal REPL, the Jupyter kernel.

``load_ipython_extension`` is the one integration point: the REPL, the kernel and a plain
``%load_ext nixos_repl`` all load it, so a magic means the same thing everywhere. It

* makes the shell's namespace the driver's test namespace (``driver.adopt_namespace``),
* registers the magics and their tab completion,
* shows errors from the machines as the user's frames plus the machine's output and console,
* and, around each cell, lets the live status line belong to that cell.
"""

from __future__ import annotations

from typing import Any

from .session import Session, current, session_from_environment

__all__ = ["Session", "load_ipython_extension", "unload_ipython_extension"]

_loaded: dict[int, Any] = {}


def load_ipython_extension(ip: Any) -> None:
    """Load the extension into ``ip`` (an IPython InteractiveShell)."""
    from .completion import make_matcher
    from .magics import NixosMagics
    from .record import install as install_recording
    from .redeploy import RebuildMagics
    from .report import HANDLED, machine_details, make_handler
    from .watch import WatchMagics

    if id(ip) in _loaded:
        return
    session = current()
    if session is None or session.closed:
        session = session_from_environment(ip)
    session.driver.adopt_namespace(ip.user_ns)
    magics = NixosMagics(ip, session)
    ip.register_magics(magics)
    ip.register_magics(WatchMagics(ip, session))
    ip.register_magics(RebuildMagics(ip, session))
    matcher = make_matcher(session.machine_names, session.snapshot_labels)
    ip.Completer.custom_matchers.append(matcher)

    handler = session.handler

    def before_cell(*_: Any) -> None:
        handler.last_machine = None
        handler.last_output.clear()
        session.sink.begin_cell()

    def after_cell(*_: Any) -> None:
        session.presenter.settle()
        session.sink.end_cell()

    def details(value: BaseException) -> list[str]:
        name = handler.last_machine
        if name is None:
            return []
        try:
            tail = session.machine(name).console.tail(20)
        except KeyError:
            tail = []
        return machine_details(value, name, handler.last_output.get(name), tail)

    ip.events.register("pre_run_cell", before_cell)
    ip.events.register("post_run_cell", after_cell)
    ip.set_custom_exc(HANDLED, make_handler(details, session.presenter.settle))
    recording = install_recording(ip, session)
    _loaded[id(ip)] = (session, magics, matcher, before_cell, after_cell, recording)


def unload_ipython_extension(ip: Any) -> None:
    """Unregister the hooks (the magics stay, as for IPython's own extensions)."""
    entry = _loaded.pop(id(ip), None)
    if entry is None:
        return
    _, _, matcher, before_cell, after_cell, recording = entry
    if recording is not None:
        recording.close()
    ip.events.unregister("pre_run_cell", before_cell)
    ip.events.unregister("post_run_cell", after_cell)
    if matcher in ip.Completer.custom_matchers:
        ip.Completer.custom_matchers.remove(matcher)
    ip.set_custom_exc((), None)
