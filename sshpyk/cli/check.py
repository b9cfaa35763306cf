"""``sshpyk check``: diagnose a host or an SSH kernel, stage by stage."""

from __future__ import annotations

import json
from typing import Any

import click

from ..config import TRANSPORTS
from ..diagnostics.check import ALL_STAGES, CheckTarget, StageResult, Status, run_check
from ..errors import SSHPykError
from ..kernelspec import InstalledKernel, find_kernel
from ..ssh.hosts import config_path, host_aliases
from .common import Context, complete_check_target, pass_obj, run, timeout_option

__all__ = ["check"]

_TITLE_WIDTH = max(len(title) for _, title in ALL_STAGES)


def _stage_line(obj: Context, result: StageResult) -> str:
    seconds = "" if result.seconds is None else f"{result.seconds:.3f}s"
    line = f"{obj.mark(result.status)} {result.title:<{_TITLE_WIDTH}} {seconds:>8}  {result.detail}"
    if result.fix:
        line += f"\n    fix: {result.fix}"
    return line


def _aliases_for(ssh_config: str | None) -> list[str]:
    try:
        return host_aliases(config_path(ssh_config))
    except SSHPykError:
        return []


def _target(target: str, opts: dict[str, Any]) -> CheckTarget:
    """What to check: an installed SSH kernel's settings, else a host alias; the
    command line's options override either."""
    kernel: InstalledKernel | None = None
    try:
        kernel = find_kernel(target)
    except SSHPykError:
        kernel = None
    if kernel is not None and kernel.is_ssh:
        what = CheckTarget.from_spec(kernel.spec)
    elif kernel is not None and target not in _aliases_for(opts["ssh_config"]):
        raise SSHPykError(f"kernel {target!r} is not an SSH kernel: nothing to check remotely")
    else:
        what = CheckTarget(alias=target)
    if opts["ssh_config"]:
        what.ssh_config = opts["ssh_config"]
    for option, attr in (
        ("remote_python", "python"),
        ("remote_kernel_name", "kernel_name"),
        ("pre_command", "pre_command"),
        ("transport", "transport"),
    ):
        if opts[option] is not None:
            setattr(what, attr, opts[option])
    return what


@click.command(short_help="Diagnose a host or an SSH kernel, stage by stage.")
@click.argument("target", metavar="ALIAS|KERNEL_NAME", shell_complete=complete_check_target)
@click.option("--ssh-config", type=click.Path(dir_okay=False), help="ssh config file.")
@click.option("--remote-python", help="Remote python (default: the kernel's, else python3).")
@click.option(
    "--remote-kernel-name", help="Remote kernelspec (default: the kernel's, else python3)."
)
@click.option("--pre-command", help="Shell code run on the remote first.")
@click.option("--transport", type=click.Choice(TRANSPORTS), help="Transport of the test kernel.")
@click.option("--no-kernel", is_flag=True, help="Skip starting a test kernel.")
@timeout_option("Seconds allowed per stage.")
@click.option("--json", "as_json", is_flag=True, help="The stages as JSON.")
@pass_obj
def check(obj: Context, target: str, **opts: Any) -> None:
    """Diagnose a host or an SSH kernel, stage by stage, with a fix for each failure.

    Stages: config resolution, TCP connect, host key, authentication, remote python,
    jupyter_client, remote kernelspec, TCP forwarding, ipc (unix sockets), the batch
    scheduler on the login node (batch kernels only), and a test kernel started and
    answering (for a batch kernel, a real job). A KERNEL_NAME of an installed SSH kernel checks its
    settings; anything else is taken as a host alias. Exits 1 if a stage failed.
    """
    what = _target(target, opts)

    def report(result: StageResult) -> None:
        if not opts["as_json"]:
            click.echo(_stage_line(obj, result))

    if not opts["as_json"]:
        subject = (
            f"kernel {what.kernel!r} on host {what.alias!r}"
            if what.kernel
            else f"host {what.alias!r}"
        )
        config = config_path(what.ssh_config) or "no ssh config file"
        click.echo(f"Checking {subject} ({config}):")
    results = run(
        run_check(what, timeout=opts["timeout"], test_kernel=not opts["no_kernel"], report=report)
    )
    failed = [r for r in results if r.status is Status.FAIL]
    if opts["as_json"]:
        click.echo(
            json.dumps(
                {
                    "target": target,
                    "kernel": what.kernel,
                    "alias": what.alias,
                    "ok": not failed,
                    "stages": [r.as_dict() for r in results],
                },
                indent=2,
            )
        )
    if failed:
        first = failed[0]
        raise click.ClickException(f"check failed at {first.title}: {first.detail}")
    if not opts["as_json"]:
        total = sum(r.seconds or 0.0 for r in results)
        warned = sum(r.status is Status.WARN for r in results)
        extra = f" ({warned} warning{'s' if warned != 1 else ''})" if warned else ""
        click.echo(f"All checks passed in {total:.2f}s{extra}.")
