"""A host's remote environments (``sshpyk add --discover``, ``sshpyk list --remote
HOST``): ask the host's agent once (its ``discover`` request: every Python with
jupyter_client and the kernelspecs each offers, found and asked on the host within a
time limit), number what it found, name the kernels ``add`` would make of them and make
their configs (:class:`~sshpyk.kernelspec.SSHKernelSpec`, the one kernel config).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import RequestTimeoutError, SSHPykError
from ..kernels.session import SSHSession
from ..kernelspec import InstalledKernel, SSHKernelSpec

__all__ = [
    "DISCOVER_TIMEOUT",
    "Discovery",
    "FoundKernel",
    "discover_host",
    "discovery_table",
    "kernel_name_for",
    "new_kernels",
    "parse_selection",
    "printable",
]

#: seconds the host has for the discovery (its agent answers with what it has by then)
DISCOVER_TIMEOUT = 30.0
#: seconds to log in and start the agent, on top
CONNECT_TIMEOUT = 20.0
_BAD_NAME_CHARS = re.compile(r"[^a-z0-9._-]+")
_INTERRUPT_MODES = ("signal", "message")


@dataclass
class FoundKernel:
    """One kernelspec of one remote Python, numbered as the table shows it."""

    number: int
    env: str
    kind: str
    python: str
    version: str
    remote_kernel_name: str
    remote_display_name: str
    language: str
    interrupt_mode: str
    #: the env's first Python kernel (``python3`` if it has one): named for the env only
    main: bool


@dataclass
class Discovery:
    """What the host's agent found: its kernels (numbered), the Pythons it skipped and
    why, its warnings (a partial result) and how long it took there."""

    alias: str
    kernels: list[FoundKernel]
    pythons: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    warnings: list[str]
    elapsed: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.alias,
            "kernels": [asdict(k) for k in self.kernels],
            "pythons": self.pythons,
            "skipped": self.skipped,
            "warnings": self.warnings,
            "elapsed": self.elapsed,
        }


def found_kernels(pythons: Iterable[Mapping[str, Any]]) -> list[FoundKernel]:
    """The kernels of the agent's ``pythons``, numbered from 1 in the agent's order
    (each env's main kernel first)."""
    found: list[FoundKernel] = []
    for python in pythons:
        specs = list(python.get("kernelspecs") or [])
        main = next((s for s in specs if s.get("name") == "python3"), None) or next(
            (s for s in specs if s.get("language", "").lower() == "python"), None
        )
        for spec in sorted(specs, key=lambda s: s is not main):
            mode = spec.get("interrupt_mode")
            found.append(
                FoundKernel(
                    number=len(found) + 1,
                    env=str(python.get("env") or "python"),
                    kind=str(python.get("kind") or ""),
                    python=str(python["python"]),
                    version=str(python.get("version") or ""),
                    remote_kernel_name=str(spec["name"]),
                    remote_display_name=str(spec.get("display_name") or spec["name"]),
                    language=str(spec.get("language") or ""),
                    interrupt_mode=mode if mode in _INTERRUPT_MODES else "signal",
                    main=spec is main,
                )
            )
    return found


async def discover_host(
    alias: str,
    *,
    ssh_config: str | None = None,
    python: str = "python3",
    pre_command: str | None = None,
    roots: Iterable[str] = (),
    search_only: bool = False,
    timeout: float = DISCOVER_TIMEOUT,
) -> Discovery:
    """Ask ``alias``'s agent (run by ``python`` after ``pre_command``) for the host's
    Pythons and kernelspecs: one request, bounded by ``timeout`` on the host and by
    the login and the agent's start on top. SSHPykError when nothing usable is found."""
    async with await SSHSession.connect(
        alias, ssh_config=ssh_config, connect_timeout=CONNECT_TIMEOUT
    ) as session:

        async def ask() -> dict[str, Any]:
            agent = await session.agent(python, pre_command)
            return await agent.discover(list(roots), search_only=search_only, timeout=timeout)

        limit = timeout + 2 * CONNECT_TIMEOUT  # the agent's request has its own, shorter
        try:
            answer = await asyncio.wait_for(ask(), limit)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"{alias!r} did not answer the discovery within {limit:g}s"
            ) from None
    pythons = list(answer.get("pythons") or [])
    discovery = Discovery(
        alias=alias,
        kernels=found_kernels(pythons),
        pythons=pythons,
        skipped=list(answer.get("skipped") or []),
        warnings=[str(w) for w in answer.get("warnings") or []],
        elapsed=float(answer.get("elapsed") or 0.0),
    )
    if not discovery.kernels:
        raise SSHPykError(_nothing_found(discovery))
    return discovery


def _nothing_found(discovery: Discovery) -> str:
    where = f"on {discovery.alias!r}"
    if discovery.pythons:
        return f"the Pythons with jupyter_client {where} offer no kernelspec: install ipykernel"
    without = [s for s in discovery.skipped if s.get("reason") == "no jupyter_client"]
    found = f" ({len(without)} Python(s) without it)" if without else ""
    late = "; " + discovery.warnings[-1] if discovery.warnings else ""
    return (
        f"no Python with jupyter_client found {where}{found}{late}: install ipykernel in an "
        "env, or name where the envs are with --search DIR"
    )


def discovery_table(kernels: Iterable[FoundKernel]) -> list[list[str]]:
    """The rows (header first) of the discovered kernels."""
    rows = [["#", "ENV", "KIND", "PYTHON", "KERNEL", "LANGUAGE", "DISPLAY NAME"]]
    for k in kernels:
        python = f"{k.python} ({k.version})" if k.version else k.python
        cells = [k.env, k.kind, python, k.remote_kernel_name, k.language, k.remote_display_name]
        rows.append([str(k.number), *map(printable, cells)])
    return rows


def printable(text: object) -> str:
    """``text`` safe for a terminal: what the remote host named (envs, display names,
    paths) may hold control characters (escape sequences); each of those, and every
    other character that does not print, is shown escaped (``\\x1b``)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def parse_selection(text: str, count: int) -> list[int]:
    """The numbers in ``text`` ("1,3-4": 1, 3 and 4), each in 1..count, in order and
    once; SSHPykError for anything else."""
    numbers: dict[int, None] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise SSHPykError(f"{part!r} is not a number or a range (e.g. 1,3-4)") from None
        if not 1 <= low <= high <= count:
            raise SSHPykError(f"{part!r} is not in 1-{count}")
        numbers.update((n, None) for n in range(low, high + 1))
    return list(numbers)


def kernel_name_for(alias: str, kernel: FoundKernel) -> str:
    """``ssh-<host>-<env>`` for an env's main kernel, ``ssh-<host>-<env>-<kernel>`` for
    its others, in the characters a kernel name may have."""
    parts = ["ssh", alias, kernel.env]
    if not kernel.main:
        parts.append(kernel.remote_kernel_name)
    name = "-".join(_BAD_NAME_CHARS.sub("-", p.lower()).strip("-._") for p in parts)
    return re.sub(r"-{2,}", "-", name)


def display_name_for(alias: str, kernel: FoundKernel) -> str:
    """``<env> (<host>)``; an env's other kernels add their own display name."""
    if kernel.main:
        return printable(f"{kernel.env} ({alias})")
    return printable(f"{kernel.env} {kernel.remote_display_name} ({alias})")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate.lower() in taken:  # ends: each round takes a new suffix
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate.lower())
    return candidate


def new_kernels(
    discovery: Discovery,
    chosen: Iterable[FoundKernel],
    base: Mapping[str, Any],
    installed: Iterable[InstalledKernel],
) -> list[tuple[FoundKernel, SSHKernelSpec | None, str | None]]:
    """For each chosen kernel: (it, the config to add or None, the installed kernel
    that already runs it or None). A new config is ``base`` (the options of ``add``)
    plus what was found; its name is unique among the installed kernels'."""
    installed = list(installed)
    taken = {k.name.lower() for k in installed}
    same: dict[tuple[Any, ...], str] = {}
    for k in installed:
        if k.is_ssh and not k.error:
            try:
                spec = k.spec
            except (SSHPykError, TypeError):
                continue
            found = (spec.ssh_host_alias, spec.remote_python, spec.remote_kernel_name)
            same.setdefault((*found, spec.pre_command), k.name)
    out: list[tuple[FoundKernel, SSHKernelSpec | None, str | None]] = []
    alias = discovery.alias
    for kernel in chosen:
        key = (alias, kernel.python, kernel.remote_kernel_name, base.get("pre_command"))
        if key in same:
            out.append((kernel, None, same[key]))
            continue
        spec = SSHKernelSpec(
            **{
                **base,
                "name": _unique(kernel_name_for(alias, kernel), taken),
                "ssh_host_alias": alias,
                "remote_python": kernel.python,
                "remote_kernel_name": kernel.remote_kernel_name,
                "display_name": display_name_for(alias, kernel),
                "language": kernel.language or "python",
                "interrupt_mode": kernel.interrupt_mode,
            }
        )
        spec.validate()
        same[key] = spec.name
        out.append((kernel, spec, None))
    return out
