"""The ``sshpyk`` command line: manage SSH kernelspecs, diagnose hosts, find and stop
remote kernels.

One module per command family, each command a plain Click command registered here:
:mod:`.kernels` (add, edit, delete), :mod:`.listing` (list), :mod:`.check` (check),
:mod:`.ps` (ps, ports, kill), :mod:`.attach` (attach), :mod:`.discover` (``add --discover``,
``list --remote HOST``); :mod:`.common` holds what they share.
The commands are thin: kernelspecs live in :mod:`sshpyk.kernelspec`, diagnostics,
listing and remote kernels in :mod:`sshpyk.diagnostics`, ssh config questions in
:mod:`sshpyk.ssh.hosts`.

Conventions: user errors are one line on stderr with exit code 1 (usage errors 2); the
traceback appears only at ``-vvv``. Colour only when the stream is a terminal and
``NO_COLOR`` is unset. Kernel names and host aliases complete in the shell
(``eval "$(_SSHPYK_COMPLETE=bash_source sshpyk)"``).
"""

from __future__ import annotations

import click

from .. import __version__
from .attach import attach
from .check import check
from .common import Context, SSHPykGroup, setup_logging
from .kernels import add, delete, edit
from .listing import list_kernels
from .ps import kill, ports, ps

__all__ = ["main"]


@click.group(cls=SSHPykGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--verbose",
    "-v",
    count=True,
    help="More logs: -v warnings, -vv info, -vvv debug and tracebacks.",
)
@click.version_option(__version__, "--version", prog_name="sshpyk")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """Manage Jupyter kernels that run on remote hosts over SSH.

    Hosts are Host aliases of your ssh config (~/.ssh/config unless --ssh-config).
    """
    setup_logging(verbose)
    ctx.obj = Context(verbose)


for _command in (list_kernels, add, edit, delete, check, ps, ports, kill, attach):
    main.add_command(_command)
