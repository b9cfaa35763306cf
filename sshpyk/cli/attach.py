"""``sshpyk attach``: forward a running remote kernel to local ports."""

from __future__ import annotations

from typing import Any

import click

from ..attach import attach_kernel
from ..config import LOCAL_TRANSPORTS
from .common import complete_aliases, host_options, run, targets, timeout_option

__all__ = ["attach"]


@click.command(short_help="Forward a running remote kernel to local ports.")
@click.argument("alias", metavar="ALIAS", shell_complete=complete_aliases)
@click.argument("kernel_id", metavar="KERNEL_ID")
@click.option(
    "--connection-file",
    type=click.Path(dir_okay=False),
    help="Where to write the local connection file (default: Jupyter's runtime dir).",
)
@click.option("--pre-command", help="Shell code run on the remote before the agent.")
@click.option(
    "--local-transport",
    type=click.Choice(LOCAL_TRANSPORTS),
    default="tcp",
    show_default=True,
    help="tcp: 127.0.0.1 ports, for tools that only speak TCP (any local user can "
    "connect); ipc: unix sockets in a private 0700 directory.",
)
@timeout_option("Seconds allowed to find and attach the kernel (not for the forwarding itself).")
@host_options
def attach(
    alias: str,
    kernel_id: str,
    connection_file: str | None,
    pre_command: str | None,
    local_transport: str,
    timeout: float,
    ssh_config: str | None,
    remote_python: str | None,
    run_root: str | None,
) -> None:
    """Reattach to kernel KERNEL_ID (or a unique prefix, see `sshpyk ps`) on ALIAS.

    Writes a connection file for `jupyter console --existing FILE` (or any Jupyter
    client) and forwards until Ctrl-C or until the kernel ends. Leaving does not
    stop the kernel.
    """
    target = targets((alias,), ssh_config, remote_python, run_root)[0]

    def ready(kernel: Any, path: Any) -> None:
        pid = kernel.process.pid if kernel.process else "?"
        click.echo(f"Attached to kernel {kernel.kernel_id} (pid {pid}) on {alias}.")
        click.echo(f"Connection file: {path}")
        click.echo(f"  jupyter console --existing {path}")
        click.echo("Forwarding; Ctrl-C to detach (the kernel keeps running).", err=True)

    try:
        code = run(
            attach_kernel(
                target.alias,
                kernel_id,
                ssh_config=target.ssh_config,
                python=target.python,
                pre_command=pre_command or target.pre_command,
                run_root=next((r for r in target.run_roots if r), None),
                connection_file=connection_file,
                local_transport=local_transport,
                timeout=timeout,
                on_ready=ready,
            )
        )
    except KeyboardInterrupt:
        click.echo("Detached; the kernel keeps running.", err=True)
        return
    click.echo(f"The kernel ended (exit code {code}).", err=True)
