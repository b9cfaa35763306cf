"""The kernels sshpyk started on remote hosts: list them (``sshpyk ps``), stop them
(``sshpyk kill``).

The remote agent finds them by their run directories (``sshpyk-*`` under the run
roots: ``$XDG_RUNTIME_DIR``, the temp dir, and any ``remote_run_root`` of an installed
kernelspec for that host) and tells whether the local side that owns each one is still
heard from (``attached``). Killing a kernel kills its process group and removes its run
directory; a kill that failed says why. Only the remote user's own kernels are
touched unless ``all_users`` (the remote user must be root). Every exchange with a host
is bounded by a timeout, hanging up included. Each launcher named by the host's
kernelspecs or its kernels is prepared on the agent first (``Launcher.prepare``) and
adds its own columns (``Launcher.ps_columns``: batch kernels show their job id, node and
job state from the scheduler); killing a batch kernel also cancels its job.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..agent.client import RemoteAgent
from ..config import DEFAULTS
from ..errors import RequestTimeoutError, SSHPykError
from ..kernels.launcher import LAUNCHERS, Launcher, find_launcher
from ..kernels.session import SSHSession
from ..kernelspec import SSHKernelSpec
from ..ssh.hosts import config_path

__all__ = [
    "HostKernels",
    "HostTarget",
    "age",
    "duration",
    "host_targets",
    "kill_failed",
    "kill_kernels",
    "kill_orphans",
    "ps_hosts",
    "ps_table",
    "size",
]


@dataclass
class HostTarget:
    """A host to inspect, and how to run the agent there."""

    alias: str
    ssh_config: str | None = None
    python: str = "python3"
    pre_command: str | None = None
    #: extra run roots to scan besides the defaults (None = the defaults only)
    run_roots: list[str | None] = field(default_factory=lambda: [None])
    #: the launchers of this host's kernelspecs (prepared on its agent before ps/kill)
    launchers: list[str] = field(default_factory=list)


@dataclass
class HostKernels:
    """The answer for one host: its kernels, or why it could not be asked."""

    alias: str
    kernels: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "kernels": self.kernels, "error": self.error}


def host_targets(
    aliases: Iterable[str],
    specs: Iterable[SSHKernelSpec],
    *,
    ssh_config: str | None = None,
    python: str | None = None,
    run_root: str | None = None,
) -> list[HostTarget]:
    """One target per host: the named aliases, or else every host of ``specs``.

    A host's installed kernelspecs supply its ssh config, remote python, pre-command
    and run roots unless given here.
    """
    specs = list(specs)
    config = config_path(ssh_config) if ssh_config else None
    wanted = list(dict.fromkeys(aliases))
    if not wanted:
        wanted = list(dict.fromkeys(s.ssh_host_alias for s in specs))
    targets: list[HostTarget] = []
    for alias in wanted:
        mine = [s for s in specs if s.ssh_host_alias == alias]
        if config:
            mine = [s for s in mine if _same_config(s.ssh_config, config)]
        by_config: dict[str | None, list[SSHKernelSpec]] = {}
        for spec in mine:
            by_config.setdefault(config or _config_or_none(spec.ssh_config), []).append(spec)
        if not by_config:
            by_config[config] = []
        for host_config, host_specs in by_config.items():
            first = host_specs[0] if host_specs else None
            roots: list[str | None] = [run_root] if run_root else []
            if not run_root:
                roots += [s.remote_run_root for s in host_specs if s.remote_run_root]
                roots.append(None)
            targets.append(
                HostTarget(
                    alias=alias,
                    ssh_config=host_config,
                    python=python or (first.remote_python if first else "python3"),
                    pre_command=first.pre_command if first and not python else None,
                    run_roots=list(dict.fromkeys(roots)),
                    launchers=list(dict.fromkeys(s.launcher for s in host_specs)),
                )
            )
    return targets


def _config_or_none(path: str | None) -> str | None:
    try:
        return config_path(path) if path else None
    except SSHPykError:
        return path


def _same_config(a: str | None, b: str | None) -> bool:
    return _config_or_none(a) == _config_or_none(b)


#: What closing a host's connection may take beyond the caller's timeout when the host
#: stopped answering (it is cut off then).
CLOSE_GRACE = 0.5

T = TypeVar("T")


async def _on_host(
    target: HostTarget, timeout: float, work: Callable[[RemoteAgent], Awaitable[T]]
) -> T:
    """Connect, start the agent and run ``work`` on it, all within ``timeout`` seconds;
    the connection is then closed with what is left (at least CLOSE_GRACE seconds).

    A host that stops answering raises RequestTimeoutError (one line) instead of hanging.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    session: SSHSession | None = None

    async def body() -> T:
        nonlocal session
        session = await SSHSession.connect(
            target.alias,
            ssh_config=target.ssh_config,
            connect_timeout=timeout,
            persist=DEFAULTS.connection_persist,
        )
        agent = await session.agent(target.python, target.pre_command)
        return await work(agent)

    try:
        return await asyncio.wait_for(body(), timeout)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"no answer from {target.alias!r} within {timeout:g}s") from None
    finally:
        if session is not None:
            await session.aclose(timeout=max(CLOSE_GRACE, deadline - loop.time()))


def _launchers(names: Iterable[str | None]) -> list[Launcher]:
    """The launchers called ``names``, once each (names this version lacks left out)."""
    found = (find_launcher(name) for name in names)
    return list(dict.fromkeys(launcher for launcher in found if launcher is not None))


async def _prepare(
    agent: RemoteAgent, names: Iterable[str | None], prepared: set[str]
) -> list[Launcher]:
    """Prepare the launchers called ``names`` not in ``prepared`` yet on ``agent`` (and
    add them to it); returns those it prepared."""
    new = [launcher for launcher in _launchers(names) if launcher.name not in prepared]
    for launcher in new:
        await launcher.prepare(agent)
        prepared.add(launcher.name)
    return new


async def _ps(
    agent: RemoteAgent, target: HostTarget, all_users: bool = False, usage: bool = False
) -> list[dict[str, Any]]:
    """Every kernel under the target's run roots, with every launcher named by its
    kernelspecs or its kernels prepared on the agent; ``usage``: with what each costs.
    The roots are asked at once (a fresh agent's usage sample then takes its second
    or so once, not once per root)."""

    async def ask_all() -> list[list[dict[str, Any]]]:
        return list(
            await asyncio.gather(
                *(agent.ps(run_root=r, all_users=all_users, usage=usage) for r in target.run_roots)
            )
        )

    seen: dict[str, dict[str, Any]] = {}
    prepared: set[str] = set()
    await _prepare(agent, target.launchers, prepared)
    answers = await ask_all()
    new = await _prepare(agent, (k.get("launcher") for ks in answers for k in ks), prepared)
    if any(launcher.ps_columns for launcher in new):
        # kernels of a launcher no kernelspec here names: ask again, now that the
        # agent can fill in that launcher's columns (a scheduler's job state)
        answers = await ask_all()
    for kernels in answers:
        for kernel in kernels:
            seen.setdefault(str(kernel.get("run_dir")), kernel)
    return sorted(seen.values(), key=lambda k: (k.get("started") or 0, str(k.get("kernel_id"))))


async def _ps_host(
    target: HostTarget, timeout: float, all_users: bool, usage: bool = False
) -> HostKernels:
    result = HostKernels(target.alias)
    try:
        result.kernels = await _on_host(target, timeout, lambda a: _ps(a, target, all_users, usage))
    except SSHPykError as exc:
        result.error = str(exc)
    return result


async def ps_hosts(
    targets: Iterable[HostTarget],
    *,
    timeout: float = 30.0,
    all_users: bool = False,
    usage: bool = False,
) -> list[HostKernels]:
    """Every host's sshpyk kernels, hosts asked concurrently; errors are per host.

    Each host answers within ``timeout`` seconds (plus CLOSE_GRACE to hang up) or
    gets an error. ``all_users`` (the remote user must be root) lists every user's
    kernels, not only the remote user's own. ``usage``: with what each kernel costs
    (cpu_percent, rss_bytes, gpu: see the agent's usage.py; about a second longer)."""
    return list(await asyncio.gather(*(_ps_host(t, timeout, all_users, usage) for t in targets)))


async def kill_kernels(
    target: HostTarget,
    kernel_ids: Iterable[str],
    *,
    all_users: bool = False,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Kill kernels by id or unique id prefix; returns one entry per kernel tried, with
    ``error`` set (a one-line reason) for those that could not be killed or removed.

    Every id is resolved before any kernel is killed: an unknown or ambiguous one
    raises SSHPykError and nothing is killed. The whole exchange takes at most
    ``timeout`` seconds (RequestTimeoutError otherwise).
    """
    wanted = list(kernel_ids)

    async def work(agent: RemoteAgent) -> list[dict[str, Any]]:
        kernels = await _ps(agent, target, all_users)
        chosen: dict[str, dict[str, Any]] = {}
        for kernel_id in wanted:
            matches = {
                str(k["kernel_id"]): k for k in kernels if str(k["kernel_id"]).startswith(kernel_id)
            }
            if not matches:
                raise SSHPykError(
                    f"no sshpyk kernel {kernel_id!r} on {target.alias!r} "
                    f"(see `sshpyk ps {target.alias}`)"
                )
            if len(matches) > 1:
                raise SSHPykError(
                    f"{kernel_id!r} matches {len(matches)} kernels on {target.alias!r}: "
                    f"{', '.join(sorted(matches))}; give more of the id"
                )
            chosen.update(matches)
        killed = []
        for full_id, kernel in chosen.items():
            root = os.path.dirname(str(kernel["run_dir"]))
            for launcher in _launchers([kernel.get("launcher")]):
                await launcher.prepare(agent)  # a batch kernel's kill cancels its job
            killed += await agent.kill(full_id, run_root=root, all_users=all_users, timeout=timeout)
        return killed

    return await _on_host(target, timeout, work)


async def kill_orphans(
    target: HostTarget, *, all_users: bool = False, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Kill every kernel whose local owner is gone; returns one entry per kernel tried
    (``error`` set for failures). Bounded by ``timeout`` like :func:`kill_kernels`."""

    async def work(agent: RemoteAgent) -> list[dict[str, Any]]:
        killed: dict[str, dict[str, Any]] = {}
        await _ps(agent, target, all_users)  # prepares the launchers of every kernel
        for root in target.run_roots:
            for kernel in await agent.kill(
                orphans=True, run_root=root, all_users=all_users, timeout=timeout
            ):
                killed.setdefault(str(kernel.get("run_dir")), kernel)
        return list(killed.values())

    return await _on_host(target, timeout, work)


def kill_failed(entry: dict[str, Any]) -> str | None:
    """Why the kill of this ``kill`` answer entry failed, or None if it was killed.

    An entry with ``error`` set failed (the kernel or its run dir is still there);
    any other entry was killed (agents before the ``killed``/``error`` fields only
    listed what they killed)."""
    error = entry.get("error")
    if error:
        return " ".join(str(error).split())
    return None


def age(epoch: float | None, now: float | None = None) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago`` (``-`` for None)."""
    if not epoch:
        return "-"
    return f"{duration((now or time.time()) - float(epoch))} ago"


def forwarded(kernel: dict[str, Any]) -> list[dict[str, Any]]:
    """A kernel record's web forwards, as its local side reported them (``forwards``:
    remote, local, url, auto), plus the ports the agent found that no local side
    forwards (``local`` None)."""
    rows = [dict(f) for f in kernel.get("forwards") or [] if isinstance(f, dict)]
    told = {f.get("remote_port") for f in rows if f.get("auto")}
    for port in kernel.get("ports") or []:
        if isinstance(port, dict) and port.get("port") not in told:
            host = str(port.get("host") or "127.0.0.1")
            host = f"[{host}]" if ":" in host else host
            rows.append(
                {
                    "remote": f"{host}:{port.get('port')}",
                    "remote_port": port.get("port"),
                    "local": None,
                    "url": None,
                    "auto": True,
                }
            )
    return rows


def ports_cell(kernel: dict[str, Any]) -> str:
    """``6006->6006, 8787->8790`` (remote port -> local port; ``->?`` not forwarded)."""
    cells = []
    for f in forwarded(kernel):
        remote = f.get("remote_port") if f.get("auto") else f.get("remote")
        cells.append(f"{remote}->{f['local'] if f.get('local') else '?'}")
    return ", ".join(cells) or "-"


def duration(seconds: float | None) -> str:
    """``3s``, ``4m``, ``2h``, ``5d`` (``-`` for None)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def size(nbytes: float | None) -> str:
    """``512KiB``, ``231MiB``, ``3.8GiB`` (``-`` for None)."""
    if nbytes is None:
        return "-"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{nbytes / 1024:.0f}KiB"


def gpu_cell(gpus: list[dict[str, Any]] | None) -> str:
    """``0:3.8GiB 27%`` per GPU the kernel holds memory on (index: its memory, the GPU's
    utilisation); ``none`` if it holds no GPU; ``-`` where the host has no nvidia-smi."""
    if gpus is None:
        return "-"
    cells = []
    for gpu in gpus:
        util = gpu.get("utilization_percent")
        load = f" {util:.0f}%" if isinstance(util, (int, float)) else ""
        cells.append(f"{gpu.get('index', '?')}:{size(gpu.get('used_memory_bytes'))}{load}")
    return ", ".join(cells) or "none"


def usage_cells(kernel: dict[str, Any]) -> list[str]:
    """CPU, MEM, GPU, IDLE and CLIENT of a kernel's ``ps`` record."""
    cpu = kernel.get("cpu_percent")
    return [
        f"{cpu:.0f}%" if isinstance(cpu, (int, float)) else "-",
        size(kernel.get("rss_bytes")),
        gpu_cell(kernel.get("gpu")),
        duration(kernel.get("idle_s")),
        str(kernel.get("client") or "-"),
    ]


#: the columns of :func:`usage_cells`
USAGE_COLUMNS = ["CPU", "MEM", "GPU", "IDLE", "CLIENT"]


def ps_table(hosts: Iterable[HostKernels], usage: bool = False) -> list[list[str]]:
    """Rows (header first) for the kernels of ``hosts``; ``usage``: with what each
    costs (:data:`USAGE_COLUMNS`); each launcher among them with columns of its own
    adds them (``Launcher.ps_columns``; a batch launcher's: JOB ID, NODE, JOB STATE
    with the reason while pending), "-" for the other launchers' kernels. Launchers
    with the same columns (every batch scheduler) share them."""
    hosts = list(hosts)
    rows = [
        [
            "HOST",
            "KERNEL ID",
            "NAME",
            "PID",
            "STARTED",
            "LAST CONTACT",
            "LOCAL OWNER",
            "STATE",
            *(USAGE_COLUMNS if usage else []),
            "PORTS",
        ]
    ]
    present = _launchers(k.get("launcher") for h in hosts for k in h.kernels)
    shown = [
        launcher for launcher in LAUNCHERS.values() if launcher.ps_columns and launcher in present
    ]
    groups: list[tuple[str, ...]] = []
    for launcher in shown:
        if launcher.ps_columns not in groups:
            groups.append(launcher.ps_columns)
            rows[0] += launcher.ps_columns
    now = time.time()
    for host in hosts:
        for k in host.kernels:
            started = k.get("started")
            owner = "alive" if k.get("attached") else "gone"
            if k.get("persistent"):
                owner += " (persistent)"
            rows.append(
                [
                    host.alias,
                    str(k.get("kernel_id")),
                    str(k.get("kernel_name")),
                    str(k.get("pid")),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "-",
                    age(k.get("last_contact"), now),
                    owner,
                    "running" if k.get("alive") else "dead",
                    *(usage_cells(k) if usage else []),
                    ports_cell(k),
                ]
            )
            own = find_launcher(k.get("launcher"))
            for columns in groups:
                if own is not None and own in shown and own.ps_columns == columns:
                    rows[-1] += own.ps_cells(k)
                else:
                    rows[-1] += ["-"] * len(columns)
    return rows


def broker_line(status: dict[str, Any] | None, now: float | None = None) -> str:
    """One line on the connection broker (``ps``): its pid, age, connections and the
    local processes using each."""
    if status is None:
        return "Connection broker: none running (each process connects by itself)."
    parts = []
    for conn in status.get("connections") or []:
        state = "up" if conn.get("connected") else "down"
        users = int(conn.get("processes") or 0)
        using = f"{users} process(es)" if users else f"idle, kept {conn.get('persist', 0):g}s"
        parts.append(f"{conn.get('alias')} ({state}, {using})")
    held = ", ".join(parts) or "no connection"
    return (
        f"Connection broker: pid {status.get('pid')}, started {age(status.get('started'), now)}: "
        f"{held}."
    )
