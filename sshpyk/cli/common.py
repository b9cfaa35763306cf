"""What every command shares: the context object, error handling, running SSH work,
shell completion and the host options of ``ps``/``kill``/``attach``."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import IO, Any, TypeVar

import click
from click.shell_completion import CompletionItem

from ..diagnostics.check import Status
from ..diagnostics.discover import printable
from ..diagnostics.inventory import HostKernels, HostTarget, host_targets
from ..errors import SSHPykError
from ..kernelspec import installed_kernels
from ..ssh.hosts import config_path, host_aliases

__all__ = [
    "ALL_USERS_HELP",
    "Context",
    "SSHPykGroup",
    "complete_aliases",
    "complete_check_target",
    "complete_kernels",
    "fail_hosts",
    "host_options",
    "pass_obj",
    "print_table",
    "run",
    "setup_logging",
    "targets",
    "timeout_option",
    "use_color",
]

T = TypeVar("T")

_MARK_COLORS = {
    Status.OK: "green",
    Status.FAIL: "red",
    Status.WARN: "yellow",
    Status.SKIP: "bright_black",
}


def use_color(stream: IO[Any] | None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Context:
    """Passed to every command (``ctx.obj``)."""

    def __init__(self, verbose: int) -> None:
        self.verbose = verbose

    @property
    def color(self) -> bool:
        return use_color(sys.stdout)

    def mark(self, status: Status) -> str:
        if not self.color:
            return status.mark
        return click.style(status.mark, fg=_MARK_COLORS[status], bold=True)


pass_obj = click.make_pass_decorator(Context)


def setup_logging(verbose: int) -> None:
    level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class SSHPykGroup(click.Group):
    """Turns sshpyk and OS errors into one-line messages (tracebacks only at -vvv)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (SSHPykError, OSError) as exc:
            obj = ctx.find_object(Context)
            if obj is not None and obj.verbose >= 3:
                raise
            raise click.ClickException(_one_line(exc) or type(exc).__name__) from None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one command's SSH work on a fresh event loop."""
    return asyncio.run(coro)


# -- shell completion ----------------------------------------------------------------


def complete_kernels(ssh_only: bool) -> Callable[..., list[CompletionItem]]:
    """Completion of installed kernel names (only SSH kernels if ``ssh_only``)."""

    def complete(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        try:
            kernels = installed_kernels()
        except Exception:  # completion must never fail loudly
            return []
        return [
            CompletionItem(k.name, help=str(k.data.get("display_name") or ""))
            for k in kernels
            if k.name.startswith(incomplete) and (k.is_ssh or not ssh_only)
        ]

    return complete


def complete_aliases(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Completion of host aliases: the ssh config's, then those of SSH kernels."""
    names: dict[str, None] = {}
    try:
        for alias in host_aliases(config_path(ctx.params.get("ssh_config"))):
            names.setdefault(alias, None)
    except Exception:
        pass
    try:
        for kernel in installed_kernels():
            if kernel.is_ssh:
                names.setdefault(kernel.spec.ssh_host_alias, None)
    except Exception:
        pass
    return [CompletionItem(n) for n in names if n.startswith(incomplete)]


def complete_check_target(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Completion of ``check``'s target: SSH kernel names, then host aliases."""
    items = complete_kernels(True)(ctx, param, incomplete)
    seen = {i.value for i in items}
    return items + [i for i in complete_aliases(ctx, param, incomplete) if i.value not in seen]


# -- hosts of ps / kill / attach -------------------------------------------------------

ALL_USERS_HELP = (
    "As root on the remote, act on every user's kernels (default: only the remote user's own)."
)


def targets(
    aliases: tuple[str, ...], ssh_config: str | None, python: str | None, run_root: str | None
) -> list[HostTarget]:
    """The hosts to ask: ``aliases``, or every host of an installed SSH kernel."""
    specs = []
    for kernel in installed_kernels():
        if kernel.is_ssh and not kernel.error:
            try:
                specs.append(kernel.spec)
            except (SSHPykError, TypeError):
                continue
    if not aliases and not specs:
        raise click.UsageError("no SSH kernels are installed: name a host (sshpyk ps ALIAS)")
    return host_targets(aliases, specs, ssh_config=ssh_config, python=python, run_root=run_root)


def host_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--ssh-config, --remote-python and --run-root of the commands that ask a host."""
    for option in reversed(
        [
            click.option("--ssh-config", type=click.Path(dir_okay=False), help="ssh config file."),
            click.option(
                "--remote-python",
                help="Remote python that runs the agent (default: that of an installed "
                "kernel for the host, else python3).",
            ),
            click.option(
                "--run-root",
                help="Remote run root to search (default: the kernels' remote run roots, "
                "$XDG_RUNTIME_DIR and the temp dir).",
            ),
        ]
    ):
        func = option(func)
    return func


def timeout_option(help: str, default: float = 30.0) -> Callable[[Callable[..., Any]], Any]:
    """``--timeout SECONDS`` (a positive number) with this command's meaning."""
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=default,
        show_default=True,
        help=help,
    )


def print_table(rows: list[list[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]  # remote names: no escapes
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def fail_hosts(hosts: list[HostKernels]) -> None:
    """Every host's error on stderr, the last one as the command's error (exit 1)."""
    failed = [h for h in hosts if h.error]
    for host in failed[:-1]:
        click.echo(f"Error: {printable(host.error)}", err=True)
    if failed:
        raise click.ClickException(printable(failed[-1].error))
