"""``sshpyk list``: installed kernels, SSH ones checked live; ``sshpyk list --remote
HOST``: the kernels HOST's environments offer (:mod:`.discover`)."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from ..diagnostics.discover import DISCOVER_TIMEOUT
from ..diagnostics.listing import collect_kernels, entry_json, render_block
from ..diagnostics.live import check_kernels
from .common import Context, complete_aliases, run, timeout_option
from .discover import discover_options, find_on_host, show_discovery

__all__ = ["list_kernels"]


class _Progress:
    """``Checking 3 hosts: 1/3 done`` on a terminal's stderr, erased when done."""

    def __init__(self, total: int) -> None:
        self.enabled = total > 0 and bool(getattr(sys.stderr, "isatty", lambda: False)())
        self.total = total
        self.width = 0
        self.show(0, "")

    def show(self, done: int, alias: str) -> None:
        if not self.enabled:
            return
        text = f"Checking {self.total} host{'s' if self.total != 1 else ''}: {done}/{self.total}"
        text += f" ({alias} done)" if alias else " ..."
        self.width = max(self.width, len(text))
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()

    def __call__(self, done: int, total: int, alias: str) -> None:
        self.total = total
        self.show(done, alias)

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


@click.command("list")
@click.argument("host", required=False, metavar="[HOST]", shell_complete=complete_aliases)
@click.option(
    "--remote",
    "-r",
    is_flag=True,
    help="Only SSH kernels; with a HOST: the kernels HOST's environments offer (its"
    " Pythons with jupyter_client and their kernelspecs), to add with"
    " `sshpyk add --discover HOST`.",
)
@click.option("--local", "-l", is_flag=True, help="Only local kernels.")
@click.option("--no-check", "-n", is_flag=True, help="Do not contact the hosts.")
@click.option("--json", "as_json", is_flag=True, help="Everything, checks included, as JSON.")
@timeout_option(
    f"Seconds each host has to answer the checks (with a HOST: to look, default"
    f" {DISCOVER_TIMEOUT:g}).",
    default=20.0,
)
@click.option("--ssh-config", type=click.Path(dir_okay=False), help="With a HOST: ssh config file.")
@click.option(
    "--remote-python", default="python3", help="With a HOST: the remote python that looks."
)
@click.option("--pre-command", help="With a HOST: shell code run first, e.g. 'module load x'.")
@discover_options
@click.pass_context
def list_kernels(
    ctx: click.Context,
    host: str | None,
    remote: bool,
    local: bool,
    no_check: bool,
    as_json: bool,
    timeout: float,
    ssh_config: str | None,
    remote_python: str,
    pre_command: str | None,
    search: tuple[str, ...],
    search_only: bool,
) -> None:
    """List local and SSH kernels, or (with a HOST) what HOST's environments offer.

    SSH kernels are checked live (one connection per host, all hosts at once):
    (v) works, (x) broken, (!) not checked because of an earlier problem or a timeout.
    """
    if host is not None:
        if local:
            raise click.UsageError("a HOST lists its remote environments: not with --local")
        given = ctx.get_parameter_source("timeout") is ParameterSource.COMMANDLINE
        discovery = find_on_host(
            host,
            ssh_config=ssh_config,
            python=remote_python,
            pre_command=pre_command,
            search=search,
            search_only=search_only,
            timeout=timeout if given else DISCOVER_TIMEOUT,
        )
        show_discovery(discovery, as_json, how_to_add=True)
        return
    if search or search_only or ssh_config or pre_command:
        raise click.UsageError(
            "--search, --search-only, --ssh-config and --pre-command need a HOST"
        )
    obj: Context = ctx.obj
    if not remote and not local:
        remote = local = True
    entries = collect_kernels(local=local, remote=remote)
    specs = [e.spec for e in entries if e.spec is not None]
    if specs and not no_check:
        hosts = {(s.ssh_host_alias, s.ssh_config) for s in specs}
        progress = _Progress(len(hosts))
        try:
            statuses = run(check_kernels(specs, timeout=timeout, progress=progress))
        finally:
            progress.close()
        for entry in entries:
            if entry.spec is not None:
                entry.status = statuses.get(entry.spec.name)
    if as_json:
        click.echo(json.dumps({"kernels": [entry_json(e) for e in entries]}, indent=2))
        return
    if not entries:
        kind = "SSH " if not local else "local " if not remote else ""
        click.echo(f"No {kind}kernels found.")
        return
    click.echo("\n\n".join(render_block(e, obj.mark) for e in entries))
