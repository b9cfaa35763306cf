"""A userspace TCP proxy on 127.0.0.1 that injects link faults (no tc netem here).

It runs its own event loop on a thread, so tests may block while it keeps working.
Faults:

* ``blackhole()``: stop moving bytes both ways (TCP buffers fill, nothing is lost);
  new connections are accepted and held. ``heal()`` resumes.
* ``reset(down=True)``: RST every connection; while down, new connections are
  reset at once (like a dead link that answers with RSTs). ``heal()`` brings it up.
* ``delay``: seconds added to every chunk in both directions.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from pathlib import Path
from typing import Any, TypeVar

_P = TypeVar("_P", bound="FaultProxy")


class _Link:
    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.proxy._flowing.wait()
            if self.proxy._down:
                self.abort()
                return
            up = socket.socket()
            up.setblocking(False)
            await loop.sock_connect(up, ("127.0.0.1", self.proxy.target_port))
            self.upstream = up
            self.tasks = [
                asyncio.ensure_future(self._pump(self.client, up)),
                asyncio.ensure_future(self._pump(up, self.client)),
            ]
            await asyncio.wait(self.tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            self.close()

    async def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.proxy._flowing.wait()
            data = await loop.sock_recv(src, 65536)
            if not data:
                return
            await self.proxy._flowing.wait()  # a blackhole holds bytes already read
            if self.proxy.delay:
                await asyncio.sleep(self.proxy.delay)
            await loop.sock_sendall(dst, data)

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0) on both sides."""
        for sock in (self.client, self.upstream):
            if sock is not None and sock.fileno() >= 0:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        self.close()

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for sock in (self.client, self.upstream):
            if sock is not None:
                sock.close()
        self.proxy._links.discard(self)


class FaultProxy:
    #: what carries one accepted connection (a subclass may delay it: benchmarks/lib/proxy.py)
    link_class: type[_Link] = _Link

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.delay = 0.0
        self.accepted = 0
        self._links: set[_Link] = set()
        self._down = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._server: socket.socket | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self: _P) -> _P:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.setblocking(False)
        self._server, self.port = server, server.getsockname()[1]
        self._thread.start()
        self._call(self._flowing.set)
        self._acceptor = asyncio.run_coroutine_threadsafe(self._accept(), self._loop)
        return self

    async def _accept(self) -> None:
        assert self._server is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(self._server)
            except OSError:
                return
            self.accepted += 1
            client.setblocking(False)
            link = self.link_class(self, client)
            if self._down:
                link.abort()
                continue
            self._links.add(link)
            link.task = asyncio.ensure_future(link.run())

    def _call(self, fn: Any, *args: Any) -> None:
        async def run() -> None:
            fn(*args)

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def blackhole(self) -> None:
        self._call(self._flowing.clear)

    def reset(self, down: bool = True) -> None:
        def do() -> None:
            self._down = down
            for link in list(self._links):
                link.abort()
            self._flowing.set()

        self._call(do)

    def heal(self) -> None:
        def do() -> None:
            self._down = False
            self._flowing.set()

        self._call(do)

    @property
    def open_links(self) -> int:
        return len(self._links)

    def stop(self) -> None:
        async def shutdown() -> None:
            for link in list(self._links):
                link.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                self._server.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self: _P) -> _P:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def proxied_ssh_config(
    sshd: Any, proxy: FaultProxy, directory: Path, alias: str, extra: str = ""
) -> Path:
    """An ssh config in ``directory`` whose ``alias`` reaches ``sshd`` through ``proxy``,
    with a known_hosts pinned to the sshd's host key at the proxy's port."""
    host_key = (sshd.root / "host_ed25519.pub").read_text().split()
    known = directory / f"known_hosts_{alias}"
    known.write_text(f"[127.0.0.1]:{proxy.port} {host_key[0]} {host_key[1]}\n")
    config = directory / f"ssh_config_{alias}"
    config.write_text(
        f"""Host {alias}
  HostName 127.0.0.1
  Port {proxy.port}
  User {sshd.user}
  IdentityFile {sshd.root / "id_ed25519"}
  IdentitiesOnly yes
  UserKnownHostsFile {known}
{extra}"""
    )
    return config
