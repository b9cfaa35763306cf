"""The connection broker's control channel: slots and last wills, both sides.

A client of the broker (:mod:`sshpyk.ssh.brokered`) opens the subsystem
:data:`SUBSYSTEM` on its connection; the broker answers it itself (nothing goes
upstream). JSON lines; each request has an ``id`` that its answer repeats; several
may be in flight (a ``claim`` may wait).

* Slots (per upstream host): a single-flight store of small JSON values, e.g. the
  remote agent the processes of this user share. ``claim KEY`` answers the value, or
  ``fill`` to exactly one claimer, which then ``put``\\ s it (or ``abandon``\\ s, or its
  channel closes: the next claimer fills); the others wait for it, bounded by their
  ``timeout``. ``drop KEY VALUE`` forgets a value found stale. Clients put their values
  again when they reattach, so the store heals after a broker restart.
* Last wills: ``will SOCKET LINE``: when the client's process exits (its pid comes
  from the socket's SO_PEERCRED at accept, not from what it says; a process that merely
  reconnects is alive and triggers nothing), the broker opens ``SOCKET`` on the host
  (``direct-streamlocal``, as the user) and writes ``LINE``: a surviving party saying
  "this process is gone" (issue 27). ``revoke SOCKET`` withdraws it. A will whose
  host is unreachable when its process dies waits for the host's next connection.

The broker side knows nothing of what the values and lines mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

import asyncssh

from ..errors import ConnectionLostError, ProtocolError, RequestTimeoutError, translating

__all__ = ["SUBSYSTEM", "BrokerControl", "ControlSession", "Slots", "Wills"]

log = logging.getLogger("sshpyk")

SUBSYSTEM = "sshpyk-broker-control"
#: bound on one request line (values are small: a socket path and a pid)
MAX_LINE = 64 << 10
#: bound on a claim's wait, whatever the client asks
MAX_CLAIM_WAIT = 300.0
#: bound on delivering one will (open, write, close)
WILL_TIMEOUT = 10.0
#: wills per process, and pending wills per host, at most
MAX_WILLS = 64


# -- the broker's side ---------------------------------------------------------------------


class Slots:
    """One host's single-flight store (see the module docstring)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.fillers: dict[str, object] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def _wake(self, key: str) -> None:
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    async def claim(self, key: str, who: object, timeout: float) -> tuple[bool, Any]:
        """(True, value), or (False, None): ``who`` is to fill the slot."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(timeout, 0.0), MAX_CLAIM_WAIT)
        while True:  # bounded by the deadline
            if key in self.values:
                return True, self.values[key]
            if key not in self.fillers:
                self.fillers[key] = who
                return False, None
            event = self._changed.setdefault(key, asyncio.Event())
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(event.wait(), remaining)

    def put(self, key: str, value: Any, who: object) -> None:
        self.values[key] = value
        if self.fillers.get(key) is who:
            del self.fillers[key]
        self._wake(key)

    def abandon(self, key: str, who: object) -> None:
        if self.fillers.get(key) is who:
            del self.fillers[key]
            self._wake(key)

    def drop(self, key: str, value: Any) -> None:
        if key in self.values and self.values[key] == value:
            del self.values[key]

    def gone(self, who: object) -> None:
        """``who``'s channel closed: the slots it was filling go to the next claimer."""
        for key in [k for k, w in self.fillers.items() if w is who]:
            self.abandon(key, who)


#: (the upstream connection, or None while down) for a host
ConnGetter = Callable[[], "asyncssh.SSHClientConnection | None"]


class Wills:
    """Last wills of client processes, delivered when a process exits."""

    def __init__(self, tasks: Any) -> None:
        self._tasks = tasks
        #: pid -> {(host key, socket): (conn getter, line)}
        self.by_pid: dict[int, dict[tuple[Any, str], tuple[ConnGetter, bytes]]] = {}
        #: host key -> [(socket, line)] that wait for the host's next connection
        self.pending: dict[Any, list[tuple[str, bytes]]] = {}
        self._watches: dict[int, Any] = {}

    def set(self, pid: int, host: Any, conn: ConnGetter, socket: str, line: bytes) -> None:
        wills = self.by_pid.setdefault(pid, {})
        wills.pop((host, socket), None)
        while len(wills) >= MAX_WILLS:  # the oldest goes (its agent is likely gone)
            del wills[next(iter(wills))]
        wills[(host, socket)] = (conn, line)
        if pid not in self._watches:
            self._watch(pid)

    def revoke(self, pid: int, host: Any, socket: str) -> None:
        wills = self.by_pid.get(pid)
        if wills is not None:
            wills.pop((host, socket), None)

    def _watch(self, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd (macOS, old kernels): poll
            self._watches[pid] = self._tasks.create_task(self._poll(pid), name=f"will-{pid}")
            return

        def exited() -> None:
            loop.remove_reader(fd)
            os.close(fd)
            self._died(pid)

        loop.add_reader(fd, exited)
        self._watches[pid] = fd

    async def _poll(self, pid: int) -> None:
        while True:  # ends when the process does (the broker's tasks are cancelled at exit)
            await asyncio.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self._died(pid)
                return
            except PermissionError:
                continue

    def _died(self, pid: int) -> None:
        self._watches.pop(pid, None)
        for (host, socket), (conn, line) in self.by_pid.pop(pid, {}).items():
            log.info("process %d exited: delivering its will to %s", pid, socket)
            self._tasks.create_task(self._deliver(host, conn, socket, line), name="will")

    async def _deliver(self, host: Any, getter: ConnGetter, socket: str, line: bytes) -> None:
        conn = getter()
        if conn is None or not await deliver(conn, socket, line):
            pending = self.pending.setdefault(host, [])
            if len(pending) < MAX_WILLS:
                pending.append((socket, line))

    def connected(self, host: Any, conn: asyncssh.SSHClientConnection) -> None:
        """``host`` is connected again: deliver what waited for it (once)."""
        for socket, line in self.pending.pop(host, []):
            self._tasks.create_task(deliver(conn, socket, line), name="will")

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for watch in self._watches.values():
            if isinstance(watch, int):
                loop.remove_reader(watch)
                os.close(watch)
        self._watches.clear()


async def deliver(conn: asyncssh.SSHClientConnection, socket: str, line: bytes) -> bool:
    """Write ``line`` to the unix socket ``socket`` on the host; whether it went."""

    async def write() -> None:
        reader, writer = await conn.open_unix_connection(socket)
        try:
            writer.write(line.rstrip(b"\n") + b"\n")
            writer.write_eof()
            with contextlib.suppress(asyncssh.Error, OSError):
                for _ in range(1000):  # until the far end closes (its hello, then EOF)
                    if not await reader.read(65536):
                        break
        finally:
            writer.close()

    try:
        await asyncio.wait_for(write(), WILL_TIMEOUT)
        return True
    except asyncssh.ChannelOpenError as exc:  # the agent is gone: nobody to tell
        log.info("a last will to %s was not delivered: %s", socket, exc.reason)
        return True
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        log.warning("a last will to %s was not delivered: %s", socket, exc)
        return False


class ControlSession(asyncssh.SSHServerSession[bytes]):
    """The broker's end of one client's control channel."""

    def __init__(self, slots: Slots, wills: Wills, pid: int, host: Any, conn: ConnGetter) -> None:
        self._slots, self._wills = slots, wills
        self._pid, self._host, self._conn = pid, host, conn
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._buffer = b""
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:  # type: ignore[override]
        self._chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == SUBSYSTEM

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            task = asyncio.ensure_future(self._answer(line))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(self._buffer) > MAX_LINE and self._chan is not None:
            self._chan.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._slots.gone(self)
        for task in self._tasks:
            task.cancel()

    async def _answer(self, line: bytes) -> None:
        rid: Any = None
        try:
            request = json.loads(line)
            rid = request["id"]
            answer = await self._serve(request)
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"error": f"bad request: {exc}"}
        except asyncio.TimeoutError:
            answer = {"error": "timeout"}
        if self._chan is not None:
            with contextlib.suppress(OSError):
                self._chan.write(json.dumps({"id": rid, **answer}).encode() + b"\n")

    async def _serve(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "claim":
            found, value = await self._slots.claim(
                str(request["key"]), self, float(request.get("timeout", 60))
            )
            return {"value": value} if found else {"fill": True}
        if op == "put":
            self._slots.put(str(request["key"]), request["value"], self)
        elif op == "abandon":
            self._slots.abandon(str(request["key"]), self)
        elif op == "drop":
            self._slots.drop(str(request["key"]), request["value"])
        elif op == "will":
            line = str(request["line"]).encode()
            self._wills.set(self._pid, self._host, self._conn, str(request["socket"]), line)
        elif op == "revoke":
            self._wills.revoke(self._pid, self._host, str(request["socket"]))
        else:
            raise ValueError(f"unknown op {op!r}")
        return {"ok": True}


# -- the client's side ---------------------------------------------------------------------


class BrokerControl:
    """A client's control channel on its connection to the broker."""

    def __init__(self, alias: str, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.alias = alias
        #: the connection it runs on (a reconnect needs a new one)
        self.conn = process.channel.get_connection()
        self._process = process
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, alias: str, conn: asyncssh.SSHClientConnection) -> BrokerControl:
        with translating(alias):
            process = await conn.create_process(subsystem=SUBSYSTEM, encoding=None)
        return cls(alias, process)

    @property
    def closed(self) -> bool:
        return self._reader.done()

    async def _read(self) -> None:
        try:
            while line := await self._process.stdout.readline():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    answer = json.loads(line)
                    future = self._waiting.pop(int(answer["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(answer)
        except (asyncssh.Error, OSError):
            pass
        finally:
            error = ConnectionLostError(self._closed_text())
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(error)
            self._waiting.clear()

    def _closed_text(self) -> str:
        return f"the connection broker's control channel for {self.alias!r} closed"

    async def request(self, op: str, wait: float = 30.0, **fields: Any) -> dict[str, Any]:
        if self.closed:
            raise ConnectionLostError(self._closed_text())
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        with contextlib.suppress(asyncssh.Error, OSError, RuntimeError):
            self._process.stdin.write(json.dumps({"id": rid, "op": op, **fields}).encode() + b"\n")
        try:
            answer = await asyncio.wait_for(future, wait)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"the connection broker did not answer {op!r} within {wait:g}s"
            ) from None
        finally:
            self._waiting.pop(rid, None)
        if "error" in answer:
            if answer["error"] == "timeout":
                raise RequestTimeoutError(f"timed out in the connection broker's {op!r}")
            raise ProtocolError(f"the connection broker refused {op!r}: {answer['error']}")
        return answer

    async def claim(self, key: str, timeout: float) -> tuple[bool, Any]:
        """(True, value), or (False, None): this process is to fill the slot (then
        :meth:`put` or :meth:`abandon`)."""
        answer = await self.request("claim", timeout + 5, key=key, timeout=timeout)
        return (False, None) if answer.get("fill") else (True, answer.get("value"))

    async def put(self, key: str, value: Any) -> None:
        await self.request("put", key=key, value=value)

    async def abandon(self, key: str) -> None:
        await self.request("abandon", key=key)

    async def drop(self, key: str, value: Any) -> None:
        await self.request("drop", key=key, value=value)

    async def will(self, socket: str, line: str) -> None:
        await self.request("will", socket=socket, line=line)

    async def revoke(self, socket: str) -> None:
        await self.request("revoke", socket=socket)

    async def aclose(self) -> None:
        self._process.close()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._reader, 5)
