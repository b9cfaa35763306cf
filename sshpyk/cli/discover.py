"""Discovery of a host's remote environments for ``sshpyk add --discover HOST`` and
``sshpyk list --remote HOST``: the table of what the host offers, and adding kernels
for all of it (``--all``) or for the numbers chosen (``--select``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from ..diagnostics.discover import (
    DISCOVER_TIMEOUT,
    Discovery,
    discover_host,
    discovery_table,
    new_kernels,
    parse_selection,
    printable,
)
from ..kernelspec import installed_kernels, write_spec
from .common import print_table, run

__all__ = ["add_discovered", "discover_options", "find_on_host", "show_discovery"]

#: what the kernels that ``add --discover`` writes take from the discovery, not from
#: the options of ``add`` (the host is ``--discover``'s; the agent's python, once found)
FOUND_FIELDS = (
    "name",
    "ssh_host_alias",
    "remote_python",
    "remote_kernel_name",
    "display_name",
    "language",
    "interrupt_mode",
)


def discover_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--search`` and ``--search-only``, the options of every discovery."""
    for option in reversed(
        [
            click.option(
                "--search",
                multiple=True,
                metavar="PATH",
                help="Also look for environments in this remote directory (two levels"
                " down, e.g. ~/projects for ~/projects/x/.venv) or use this remote"
                " python (repeatable).",
            ),
            click.option(
                "--search-only",
                is_flag=True,
                help="Look only in the --search paths (not in conda's list, the common"
                " env directories nor the PATH).",
            ),
        ]
    ):
        func = option(func)
    return func


def find_on_host(
    alias: str,
    *,
    ssh_config: str | None,
    python: str,
    pre_command: str | None,
    search: tuple[str, ...],
    search_only: bool,
    timeout: float = DISCOVER_TIMEOUT,
) -> Discovery:
    """Ask the host (one agent request); its warnings on stderr."""
    if search_only and not search:
        raise click.UsageError("--search-only needs at least one --search PATH")
    discovery = run(
        discover_host(
            alias,
            ssh_config=ssh_config,
            python=python,
            pre_command=pre_command,
            roots=search,
            search_only=search_only,
            timeout=timeout,
        )
    )
    for warning in discovery.warnings:
        click.echo(f"Warning: {printable(warning)}", err=True)
    return discovery


def show_discovery(discovery: Discovery, as_json: bool, how_to_add: bool) -> None:
    """The table (or the JSON) of what was found; ``how_to_add``: then how to add it."""
    if as_json:
        click.echo(json.dumps(discovery.as_dict(), indent=2))
        return
    count = len(discovery.kernels)
    pythons = len(discovery.pythons)
    click.echo(
        f"{count} kernel{'s' * (count != 1)} in {pythons} Python"
        f"{'s' * (pythons != 1)} on {printable(discovery.alias)} ({discovery.elapsed:.1f}s there):"
    )
    print_table(discovery_table(discovery.kernels))
    without = [s for s in discovery.skipped if s.get("reason") == "no jupyter_client"]
    others = len(discovery.skipped) - len(without)
    if without or others:
        click.echo(
            f"Not listed: {len(without)} Python(s) without jupyter_client, {others} that"
            " could not be asked (see --json)."
        )
    if how_to_add:
        click.echo(
            f"\nAdd them with: sshpyk add --discover {discovery.alias} --all (or --select 1,3-4)"
        )


def add_discovered(
    discovery: Discovery,
    *,
    select: str | None,
    add_all: bool,
    base: dict[str, Any],
    as_json: bool,
) -> None:
    """Add the kernels chosen (``add_all``, or the numbers of ``select``; an empty
    ``select`` asks) with the options of ``add`` in ``base``; those already added for
    the same python and kernelspec are left as they are."""
    if not add_all and select is None:
        show_discovery(discovery, as_json, how_to_add=True)
        return
    if not as_json:
        show_discovery(discovery, False, how_to_add=False)
    if add_all:
        numbers = [k.number for k in discovery.kernels]
    else:
        text = select or click.prompt(
            "Add which kernels? (numbers, e.g. 1,3-4)", default="", show_default=False
        )
        numbers = parse_selection(text, len(discovery.kernels))
    chosen = [discovery.kernels[n - 1] for n in numbers]
    added = []
    for kernel, spec, existing in new_kernels(discovery, chosen, base, installed_kernels()):
        entry = {"number": kernel.number, "name": existing, "added": False}
        if spec is None:
            if not as_json:
                click.echo(f"#{kernel.number}: already added as {printable(existing)!r}")
        else:
            path = write_spec(spec)
            entry.update(name=spec.name, added=True, display_name=spec.display_name, path=path)
            if not as_json:
                click.echo(f"Added kernel {spec.name!r} ({printable(spec.display_name)}) in {path}")
        added.append(entry)
    if as_json:
        click.echo(json.dumps({**discovery.as_dict(), "added": added}, indent=2))
    elif not chosen:
        click.echo("Nothing added.")
