"""``sshpyk list``: installed kernels, SSH ones checked live."""

from __future__ import annotations

import json
import sys

import click

from ..diagnostics.listing import collect_kernels, entry_json, render_block
from ..diagnostics.live import check_kernels
from .common import Context, pass_obj, run, timeout_option

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
@click.option("--remote", "-r", is_flag=True, help="Only SSH kernels.")
@click.option("--local", "-l", is_flag=True, help="Only local kernels.")
@click.option("--no-check", "-n", is_flag=True, help="Do not contact the hosts.")
@click.option("--json", "as_json", is_flag=True, help="Everything, checks included, as JSON.")
@timeout_option("Seconds each host has to answer the checks.", default=20.0)
@pass_obj
def list_kernels(
    obj: Context, remote: bool, local: bool, no_check: bool, as_json: bool, timeout: float
) -> None:
    """List local and SSH kernels.

    SSH kernels are checked live (one connection per host, all hosts at once):
    (v) works, (x) broken, (!) not checked because of an earlier problem or a timeout.
    """
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
