"""Web apps a remote kernel starts, open in the local browser at the URL they print.

TensorBoard, a Dask dashboard, Dash, Bokeh, Streamlit print ``http://127.0.0.1:PORT``:
a URL of the remote machine. The agent finds the TCP listeners of the kernel's
processes (agent/remote/ports.py) and says so in ``ports`` events; :class:`WebForwards`
then listens on the SAME port here, on 127.0.0.1 (and ::1 where it can), so the
printed URL works unchanged, and pipes each accepted connection over its own SSH
channel on the host's one connection: ``direct-tcpip`` to the listener (sshd connects
to it on the remote host), or, for a kernel on an execution host (a batch job), a
``direct-streamlocal`` channel to the agent's relay socket for that port, which
reaches the node over the authenticated node connection. A port taken here gets a
free one instead, and the log says where. When the remote listener closes, so does
the local one. Explicit forwards (``--forward``) are opened with the kernel and kept
across its restarts.

Listeners survive a dropped SSH link (connections accepted meanwhile wait for the
reconnect, bounded); connections open when it dropped end with it. Local listeners
bind loopback only; as with a local Jupyter, any local user can connect to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..config import parse_forward
from ..ssh.hosts import CHANNEL_WINDOW
from ..tasks import TaskOwner
from .forwards import _Accepted, _DirectEnd

if TYPE_CHECKING:
    from ..agent.process import KernelProcess
    from .session import SSHSession

__all__ = ["WebForwards"]

log = logging.getLogger("sshpyk")

#: seconds an accepted connection waits for the SSH connection (a reconnect) and its channel
CONNECT_TIMEOUT = 30.0
#: how a --forward may name the remote host itself
LOCALHOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Target:
    """Where one forward goes on the remote side: a host and port (``direct-tcpip``)
    or a unix socket path (``direct-streamlocal``: the agent's relay socket)."""

    host: str
    port: int
    path: str = ""

    @property
    def remote(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class PortForward:
    """Local listeners on one port (127.0.0.1, and ::1 where available), each accepted
    connection piped to ``target`` over its own SSH channel."""

    def __init__(self, session: SSHSession, target: Target, owner: TaskOwner) -> None:
        self.session = session
        self.target = target
        self.owner = owner
        self.port = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[Any] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self, port: int) -> int:
        """Listen on ``port`` if it is free here (on 127.0.0.1), else on a free one;
        returns the port. OSError if nothing can be bound."""
        loop = asyncio.get_running_loop()
        try:
            first = await loop.create_server(self._accept, "127.0.0.1", port)
        except OSError:
            if not port:
                raise
            first = await loop.create_server(self._accept, "127.0.0.1", 0)
        self._servers.append(first)
        self.port = first.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):  # no IPv6 here, or the port is taken on ::1
            self._servers.append(await loop.create_server(self._accept, "::1", self.port))
        return self.port

    def _accept(self) -> _Accepted:
        accepted = _Accepted(on_close=self._connections.discard)
        self._connections.add(accepted)
        self.owner.create_task(self._connect(accepted), name=f"web-{self.target.port}")
        return accepted

    async def _connect(self, accepted: _Accepted) -> None:
        local, remote = _DirectEnd.pair(self._connections.discard)
        factory = cast(Any, lambda: remote)  # _DirectEnd speaks asyncssh's session API
        try:
            conn = await asyncio.wait_for(self.session.connection(), CONNECT_TIMEOUT)
            target = self.target
            opening: Any
            if target.path:
                opening = conn.create_unix_connection(factory, target.path, window=CHANNEL_WINDOW)
            else:
                opening = conn.create_connection(
                    factory, target.host, target.port, window=CHANNEL_WINDOW
                )
            await asyncio.wait_for(opening, CONNECT_TIMEOUT)
        except asyncio.CancelledError:
            accepted.close()
            raise
        except Exception as exc:
            log.debug("[%s] %s not forwarded: %r", self.session.alias, self.target.remote, exc)
            accepted.close()
            return
        if accepted.closed:
            remote.close()
            return
        self._connections.discard(accepted)
        self._connections.add(local)
        accepted.bind(local)

    def close(self) -> None:
        for server in self._servers:
            server.close()
        self._servers = []
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()


class WebForwards:
    """A kernel's web forwards: the explicit ones (``--forward``, for the life of this
    object) and the automatic ones (the current kernel process's ``ports``)."""

    def __init__(
        self, session: SSHSession, kernel_id: str, specs: list[str], logger: Any = log
    ) -> None:
        self.session = session
        self.kernel_id = kernel_id
        self.logger = logger
        self.texts = [text.strip() for text in specs]
        self.specs = [parse_forward(text) for text in specs]
        self._owner = TaskOwner(f"[{session.alias}] web forwards")
        self._explicit: list[PortForward] = []
        self._auto: dict[Target, PortForward] = {}
        self._process: KernelProcess | None = None
        self._reconcile: asyncio.Task[None] | None = None
        self._closed = False

    async def open_explicit(self) -> None:
        """Listen for every ``--forward`` (once); a taken local port gets a free one."""
        if self._explicit or self._closed:
            return
        for (local, host, port), text in zip(self.specs, self.texts, strict=True):
            forward = PortForward(self.session, Target(host, port), self._owner)
            try:
                await forward.open(local)
            except OSError as exc:
                self.logger.warning(
                    "[%s] --forward %s: cannot listen here: %s", self.session.alias, text, exc
                )
                continue
            self._explicit.append(forward)
            self._say(forward, local, f"--forward {text}")

    def follow(self, process: KernelProcess | None) -> None:
        """Forward the web ports of ``process`` (None: none), now and as they change."""
        if self._process is not None and self._process is not process:
            self._process.on_ports = None
        self._process = process
        if process is not None:
            process.on_ports = self._changed
        self._changed(process)

    def _changed(self, process: KernelProcess | None) -> None:
        if process is not self._process or self._closed:
            return
        if self._reconcile is None or self._reconcile.done():
            self._reconcile = self._owner.create_task(self._apply(), name="web-ports")
        # else the running pass reads the latest ports before it ends

    def _wanted(self, process: KernelProcess | None) -> set[Target]:
        """The automatic forwards ``process`` needs now (none once it ended; not the
        ports an explicit --forward already reaches)."""
        if process is None or process.exit_code is not None:
            return set()
        wanted = set()
        for entry in process.web_ports:
            target = Target(
                str(entry.get("host") or "127.0.0.1"),
                int(entry.get("port") or 0),
                str(entry.get("path") or ""),
            )
            if target.port and not self._served_explicitly(target):
                wanted.add(target)
        return wanted

    async def _apply(self) -> None:
        failed: set[Target] = set()  # could not listen here: not tried again now
        # ends when a pass finds nothing to change (each pass follows the agent's
        # latest ports event; bounded by how often they come)
        while True:
            process = self._process
            wanted = self._wanted(process)
            gone = [t for t in self._auto if t not in wanted]
            new = [t for t in wanted if t not in self._auto and t not in failed]
            if not gone and not new:
                return
            for target in gone:
                forward = self._auto.pop(target)
                forward.close()
                self.logger.info(
                    "[%s] remote port %d of kernel %s closed; %s closed",
                    *(self.session.alias, target.port, self.kernel_id, forward.url),
                )
            for target in new:
                forward = PortForward(self.session, target, self._owner)
                try:
                    await forward.open(target.port)
                except OSError as exc:
                    failed.add(target)
                    self.logger.warning(
                        "[%s] remote port %d of kernel %s not forwarded: %s",
                        *(self.session.alias, target.port, self.kernel_id, exc),
                    )
                    continue
                if self._closed or process is not self._process:
                    forward.close()
                    break
                self._auto[target] = forward
                self._say(forward, target.port, f"remote port {target.port}")
            self._report()
            if self._closed:
                return

    def _served_explicitly(self, target: Target) -> bool:
        """An explicit --forward already reaches this remote port (its localhost)."""
        return any(
            f.target.port == target.port and f.target.host in LOCALHOSTS and not target.path
            for f in self._explicit
        )

    def _say(self, forward: PortForward, wanted: int, what: str) -> None:
        """The INFO line of a new forward: ``what`` (remote port 6006, --forward
        15432:db:5432) of the kernel is at its local URL, and why not on ``wanted``."""
        taken = "" if forward.port == wanted else f" (local port {wanted} is taken)"
        self.logger.info(
            "[%s] %s of kernel %s is at %s%s",
            *(self.session.alias, what, self.kernel_id, forward.url, taken),
        )

    def listing(self) -> list[dict[str, Any]]:
        """Every forward: {"remote", "local", "url", "auto"}."""
        rows = []
        for forward, auto in [(f, False) for f in self._explicit] + [
            (f, True) for f in self._auto.values()
        ]:
            rows.append(
                {
                    "remote": forward.target.remote,
                    "remote_port": forward.target.port,
                    "local": forward.port,
                    "url": forward.url,
                    "auto": auto,
                }
            )
        return rows

    def _report(self) -> None:
        process = self._process
        if process is not None:
            process.tell_forwards(self.listing())

    def close(self) -> None:
        self._closed = True
        if self._process is not None:
            self._process.on_ports = None
        for forward in [*self._explicit, *self._auto.values()]:
            forward.close()
        self._explicit, self._auto = [], {}
        for task in self._owner.tasks:
            task.cancel()

    async def aclose(self) -> None:
        self.close()
        await asyncio.shield(self._owner.aclose())
