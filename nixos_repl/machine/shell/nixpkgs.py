"""nixpkgs' framing, for a guest without nixos-repl's ports.

Per command: ``[timeout N] bash -c '<set -euo pipefail; cmd>' </dev/null | (base64 -w 0; echo)``
and the pipeline's first status, as nixpkgs sends them, wrapped in ``S<nonce>`` and
``E<nonce> <status>`` lines so that a cut command's late reply is recognised and skipped. The
limit is the guest's GNU ``timeout`` (which kills the command's process group); a command cannot
be interrupted from the host.

The output comes over hvc0, a console port, and QEMU drops what the host does not take in time
(whole buffers: what is left is often still valid base64). So the backdoor socket is drained as
soon as it is readable (``Backdoor``), and the reply says how much it sent: before its newline,
the subshell that ran ``base64`` prints ``" <n>"``, where ``n`` is what its children wrote,
read from its own ``/proc/<pid>/io`` (``wchar``; the kernel adds a reaped child's counts to its
parent's), with builtins only, so no process is added. A reply whose length is not that, or that
is not whole base64, raises instead of returning short output. (On a kernel without I/O
accounting the count is empty and only the base64 is checked.)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
import shlex

from ...errors import MachineError
from .link import NONCE_BYTES, Backdoor, Command, abbreviate

__all__ = ["NixpkgsFraming"]

# After base64, in its subshell: " <bytes its children wrote>" (see the module's documentation).
COUNT = (
    "__nr_n=; { while read -r __nr_k __nr_v; do [[ $__nr_k == wchar: ]] && __nr_n=$__nr_v; "
    'done < /proc/$BASHPID/io; } 2>/dev/null; echo " $__nr_n"'
)


class NixpkgsFraming:
    """Commands as nixpkgs frames them (see the module's documentation)."""

    fast = False

    def __init__(self, name: str, backdoor: Backdoor) -> None:
        self.name = name
        self.backdoor = backdoor

    def rewound(self) -> None:
        pass  # every reply is matched by its nonce already

    async def settle(self) -> None:
        """Nothing is left half-way between two commands."""

    async def submit(self, cmd: Command, timeout: float | None) -> None:
        """Send ``cmd`` under a fresh nonce, whole (shielded: a cut line would desync)."""
        cmd.nonce = secrets.token_hex(NONCE_BYTES)
        self.backdoor.current = cmd
        timeout_str = f"timeout {timeout} " if timeout is not None else ""
        inner = shlex.quote(f"set -euo pipefail; {cmd.text}")
        line = (
            f"printf 'S%s\\n' {cmd.nonce}; {timeout_str}bash -c {inner} </dev/null"
            f" | (base64 -w 0; {COUNT}); printf 'E%s %s\\n' {cmd.nonce} \"${{PIPESTATUS[0]}}\"\n"
        )
        await asyncio.shield(self.backdoor.send(line.encode()))

    async def finish(self, cmd: Command, timeout: float | None) -> tuple[int, bytes]:
        """The command's status and output; the guest-side ``timeout`` enforces the limit."""
        try:
            return await self.collect(cmd)
        except asyncio.CancelledError:
            self.backdoor.log.warning(
                "this guest's shell cannot interrupt a command; its reply will be skipped"
            )
            raise

    async def collect(self, cmd: Command) -> tuple[int, bytes]:
        nonce = cmd.nonce.encode()
        stray, _ = await self.backdoor.read_marker(b"S" + nonce)
        if stray:
            self.backdoor.log.debug("dropping %d stray bytes: %r", len(stray), stray[:200])
        reply, rest = await self.backdoor.read_marker(b"\nE" + nonce + b" ")
        # All of it or nothing: console bytes QEMU dropped must not pass for output.
        encoded, space, count = reply.rpartition(b" ")
        try:
            if not space or not (count.isdigit() or count == b""):
                raise binascii.Error("the byte count is missing")
            if count and int(count) != len(encoded):
                raise binascii.Error(f"{int(count) - len(encoded)} of {int(count)} bytes lost")
            if len(encoded) % 4:
                raise binascii.Error("not a whole number of base64 groups")
            output = base64.b64decode(encoded, validate=True)
        except binascii.Error as e:
            raise MachineError(
                f"{self.name}: the output of `{abbreviate(cmd.text)}` arrived incomplete ({e}). "
                "The guest's console port loses bytes when the host falls behind (a busy "
                "machine); run the command again."
            ) from e
        cmd.output[:] = output
        return int(rest), output
