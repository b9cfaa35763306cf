"""The ``sshpyk`` command line: manage SSH kernelspecs."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import click

from . import __version__
from .errors import SSHPykError
from .kernelspec import INTERRUPT_MODES, TRANSPORTS, SSHKernelSpec, write_spec
from .session import SSHSession

__all__ = ["main"]


class Context:
    def __init__(self, verbose: int) -> None:
        self.verbose = verbose


def _setup_logging(verbose: int) -> None:
    level = {0: logging.ERROR, 1: logging.WARNING, 2: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_user_command(ctx: click.Context, coro: Any) -> Any:
    """Run a coroutine; SSHPykError becomes a one-line error (traceback only at -vvv)."""
    try:
        return asyncio.run(coro)
    except SSHPykError as exc:
        if ctx.find_object(Context) and ctx.find_object(Context).verbose >= 3:  # type: ignore[union-attr]
            raise
        raise click.ClickException(str(exc)) from None


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--remote-env")
        env[key] = value
    return env


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", count=True, help="More logs (-v warning, -vv info, -vvv debug).")
@click.version_option(__version__, "--version", prog_name="sshpyk")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Manage SSH Jupyter kernels."""
    _setup_logging(verbose)
    ctx.obj = Context(verbose)


async def _inspect(
    alias: str, ssh_config: str | None, python: str, kernel: str, pre: str | None
) -> dict[str, Any]:
    async with await SSHSession.connect(alias, ssh_config=ssh_config, connect_timeout=20) as s:
        return await asyncio.wait_for(s.inspect(python, kernel, pre), 30)


@main.command()
@click.option("--kernel-name", required=True, help="Local kernel name, e.g. ssh_gpu_py3.")
@click.option("--ssh-host-alias", required=True, help="Host alias from your ssh config.")
@click.option("--display-name", help="Shown in Jupyter (default from the remote kernelspec).")
@click.option("--language", help="Kernel language (default from the remote kernelspec).")
@click.option("--ssh-config", type=click.Path(dir_okay=False), help="ssh config file.")
@click.option(
    "--remote-python",
    default="python3",
    show_default=True,
    help="Remote environment prefix (/opt/conda/envs/x) or python executable.",
)
@click.option("--remote-kernel-name", default="python3", show_default=True)
@click.option("--start-timeout", type=float, default=60.0, show_default=True)
@click.option("--transport", type=click.Choice(TRANSPORTS), default="auto", show_default=True)
@click.option("--interrupt-mode", type=click.Choice(INTERRUPT_MODES), default=None)
@click.option("--remote-env", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--pre-command", help="Shell code run on the remote before the kernel.")
@click.option("--remote-cwd", help="Remote working directory (default: home).")
@click.option("--replace", is_flag=True, help="Overwrite an existing kernel of that name.")
@click.option("--no-check", "-n", is_flag=True, help="Do not contact the remote host.")
@click.pass_context
def add(ctx: click.Context, **opts: Any) -> None:
    """Add a new SSH kernel."""
    spec = SSHKernelSpec(
        name=opts["kernel_name"],
        ssh_host_alias=opts["ssh_host_alias"],
        display_name=opts["display_name"] or "",
        language=opts["language"] or "",
        interrupt_mode=opts["interrupt_mode"] or "signal",
        ssh_config=opts["ssh_config"],
        remote_python=opts["remote_python"],
        remote_kernel_name=opts["remote_kernel_name"],
        start_timeout=opts["start_timeout"],
        transport=opts["transport"],
        remote_env=_parse_env(opts["remote_env"]),
        pre_command=opts["pre_command"],
        remote_cwd=opts["remote_cwd"],
    )
    try:
        spec.validate()
    except SSHPykError as exc:
        raise click.ClickException(str(exc)) from None
    if not opts["no_check"]:
        info = run_user_command(
            ctx,
            _inspect(
                spec.ssh_host_alias,
                spec.ssh_config,
                spec.remote_python,
                spec.remote_kernel_name,
                spec.pre_command,
            ),
        )
        remote = info.get("kernelspec") or {}
        spec.language = spec.language or remote.get("language") or ""
        if not spec.display_name and remote.get("display_name"):
            spec.display_name = f"{remote['display_name']} ({spec.ssh_host_alias})"
        if opts["interrupt_mode"] is None:
            spec.interrupt_mode = remote.get("interrupt_mode") or "signal"
    spec.language = spec.language or "python"
    try:
        path = write_spec(spec, replace=opts["replace"])
    except SSHPykError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Added kernel {spec.name!r} ({spec.display_name or spec.name}) in {path}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
