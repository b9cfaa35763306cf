"""A link with latency: :class:`DelayProxy`, tests/support/faultproxy.py's proxy whose delay is a
latency (chunks are not queued behind each other), and what it delivered."""

from __future__ import annotations

import asyncio
import socket
import statistics

from .stats import percentile
from support.faultproxy import FaultProxy, _Link

__all__ = ["WAKE_LATENCY", "DelayProxy", "link_summary"]


#: how late this machine wakes a sleeping event loop (measured: 0.3-0.4 ms)
WAKE_LATENCY = 0.0004


async def _sleep_until(loop: asyncio.AbstractEventLoop, due: float) -> None:
    """Sleep until about ``due``. asyncio's epoll timeouts are whole milliseconds rounded
    up, plus the wake-up latency, so a plain sleep ends 0.4-1.4 ms late: sleep the whole
    number of milliseconds nearest to the time left, which ends within +-0.5 ms of ``due``
    (a chunk due exactly ``delay`` after it was read: +0.4 ms)."""
    ms = round((due - loop.time() - WAKE_LATENCY) * 1000)
    if ms > 0:
        await asyncio.sleep(ms / 1000 - 0.00005)  # 50 us less, so that the ceiling is ms


class _DelayLink(_Link):
    """A FaultProxy link that delays every chunk by ``proxy.delay`` in each direction
    *without* serialising the chunks: each is sent ``delay`` after it was read, while the
    next ones are already being read (as a real link with latency, unlike the stock
    ``_pump``, which sleeps between reading a chunk and reading the next, so that a burst of
    k chunks took k x delay and throughput was capped at 64 KiB per delay). TCP_NODELAY on
    both sockets, so that the proxy adds no Nagle wait of its own.

    A new connection reaches the target one RTT (2 x delay) after it was accepted: the
    TCP handshake of a real link (SYN, SYN-ACK), which the local accept skips. Bytes the
    client sends meanwhile wait, as they would for connect() to return."""

    proxy: DelayProxy

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.proxy._flowing.wait()
            if self.proxy._down:
                self.abort()
                return
            if self.proxy.delay:
                await asyncio.sleep(2 * self.proxy.delay)  # the TCP handshake's round trip
                if self.proxy._down:  # reset meanwhile
                    self.abort()
                    return
            up = socket.socket()
            up.setblocking(False)
            await loop.sock_connect(up, ("127.0.0.1", self.proxy.target_port))
            self.upstream = up
            self.proxy.upstream_connects += 1
            for sock in (self.client, up):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
        proxy = self.proxy
        pending: asyncio.Queue[tuple[float, float, bytes]] = asyncio.Queue()
        room = asyncio.Event()
        room.set()
        queued = 0

        async def deliver() -> None:
            nonlocal queued
            while True:
                read_at, due, data = await pending.get()
                await _sleep_until(loop, due)
                if not data:
                    return
                await proxy._flowing.wait()
                proxy.record(loop.time() - read_at)
                await loop.sock_sendall(dst, data)
                queued -= len(data)
                if queued <= proxy.MAX_QUEUED:
                    room.set()

        writer = asyncio.ensure_future(deliver())
        try:
            while True:
                await proxy._flowing.wait()
                await room.wait()
                data = await loop.sock_recv(src, 65536)
                now = loop.time()
                pending.put_nowait((now, now + proxy.delay, data))
                if not data:  # EOF: deliver what is in flight, then end the link
                    await writer
                    return
                queued += len(data)
                if queued > proxy.MAX_QUEUED:
                    room.clear()
        finally:
            writer.cancel()


class DelayProxy(FaultProxy):
    """tests/support/faultproxy.py's FaultProxy (reset, heal, blackhole, ``accepted``) whose
    ``delay`` is a latency, not a per-chunk pause (see :class:`_DelayLink`). Records the
    delay each chunk actually got, and how many connections it opened to the target."""

    MAX_QUEUED = 16 * 2**20  # bytes in flight per direction before reading pauses
    link_class = _DelayLink

    def __init__(self, target_port: int, delay: float) -> None:
        super().__init__(target_port)
        self.delay = delay
        self.upstream_connects = 0
        self.delays: list[float] = []

    def record(self, seconds: float) -> None:
        if len(self.delays) < 200_000:
            self.delays.append(seconds)


def link_summary(proxy: DelayProxy, rtt: int) -> tuple[float | None, str]:
    """What the delay proxy delivered: the per-chunk delay it actually gave."""
    if not proxy.delays:
        return None, f"the delay proxy ({rtt / 2:g} ms each way) carried no data"
    delays = sorted(d * 1000 for d in proxy.delays)
    median = statistics.median(delays)
    text = (
        f"Link: a delay proxy between the SSH clients and sshd adds {rtt / 2:g} ms to every "
        f"chunk in each direction (RTT {rtt} ms); the delay each of {len(delays)} chunks "
        f"actually got: median {median:.2f} ms, p90 {percentile(delays, 0.9):.2f} ms, "
        f"max {delays[-1]:.2f} ms (asyncio wakes at whole milliseconds plus ~0.4 ms here)."
    )
    return 2 * median, text
