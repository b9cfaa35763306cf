"""The ``sshpyk`` command line: manage SSH kernelspecs, diagnose hosts, find and stop
remote kernels.

The commands are thin: kernelspecs live in :mod:`sshpyk.kernelspec`, listing in
:mod:`sshpyk.listing`, diagnostics in :mod:`sshpyk.check`, remote kernels in
:mod:`sshpyk.inventory`, ssh config questions in :mod:`sshpyk.sshconfig`.

Conventions: user errors are one line on stderr with exit code 1 (usage errors 2); the
traceback appears only at ``-vvv``. Colour only when the stream is a terminal and
``NO_COLOR`` is unset. Kernel names and host aliases complete in the shell
(``eval "$(_SSHPYK_COMPLETE=bash_source sshpyk)"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import IO, Any, TypeVar

import click
from click.shell_completion import CompletionItem

from . import __version__
from .attach import attach_kernel
from .check import (
    SLURM_STAGE,
    STAGES,
    CheckTarget,
    StageResult,
    Status,
    check_kernels,
    run_check,
)
from .config import ConfigField, config_field, config_fields
from .errors import SSHPykError
from .forwards import LOCAL_TRANSPORTS
from .inventory import (
    HostKernels,
    HostTarget,
    host_targets,
    kill_failed,
    kill_kernels,
    kill_orphans,
    ps_hosts,
    ps_table,
)
from .kernelspec import (
    TRANSPORTS,
    InstalledKernel,
    SSHKernelSpec,
    delete_spec,
    edited_spec,
    find_kernel,
    installed_kernels,
    save_edited_spec,
    spec_changes,
    write_spec,
)
from .listing import collect_kernels, entry_json, render_block
from .session import SSHSession
from .slurm import parse_slurm_args
from .ssh.hosts import config_path, host_aliases

__all__ = ["main"]

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


def _setup_logging(verbose: int) -> None:
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


def _complete_kernels(ssh_only: bool) -> Callable[..., list[CompletionItem]]:
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


def _complete_aliases(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
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


def _complete_check_target(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[Any]:
    items = _complete_kernels(True)(ctx, param, incomplete)
    seen = {i.value for i in items}
    return items + [i for i in _complete_aliases(ctx, param, incomplete) if i.value not in seen]


# -- the group -----------------------------------------------------------------------


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
    _setup_logging(verbose)
    ctx.obj = Context(verbose)


pass_obj = click.make_pass_decorator(Context)


# -- list ------------------------------------------------------------------------------


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


@main.command("list")
@click.option("--remote", "-r", is_flag=True, help="Only SSH kernels.")
@click.option("--local", "-l", is_flag=True, help="Only local kernels.")
@click.option("--no-check", "-n", is_flag=True, help="Do not contact the hosts.")
@click.option("--json", "as_json", is_flag=True, help="Everything, checks included, as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=20.0,
    show_default=True,
    help="Seconds each host has to answer the checks.",
)
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


# -- add / edit ------------------------------------------------------------------------


def _config_option(f: ConfigField, edit: bool) -> Callable[[Callable[..., Any]], Any]:
    """The ``add``/``edit`` option of one KernelConfig field (edit: no defaults, and
    an empty value clears what may be cleared)."""
    opt = f.option
    help = (opt.edit_help if edit and opt.edit_help else opt.help) + (
        " An empty value clears it." if edit and opt.clearable else ""
    )
    kw: dict[str, Any] = {"help": help, "metavar": opt.metavar}
    decls = [f.flag, f.name]
    if f.type is bool:
        decls[0] = f"{f.flag}/--no-{f.flag[2:]}"
        kw["default"] = None if edit else f.default
    elif f.type is dict:
        kw["multiple"] = True
        kw["help"] += " Adds to or overrides what is stored." if edit else ""
    else:
        if opt.choices:
            kw["type"] = click.Choice(opt.choices)
        elif f.type is float:
            kw["type"] = float
        elif opt.path and not edit:
            kw["type"] = click.Path(dir_okay=False)
        if not edit and opt.required and not f.default:
            kw["required"] = True
        elif not edit and not opt.from_remote and f.default not in (None, ""):
            kw.update(default=f.default, show_default=True)
    if f.name == "ssh_host_alias":
        kw["shell_complete"] = _complete_aliases
    return click.option(*decls, **kw)


def _spec_options(edit: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of ``add`` and ``edit``: one per KernelConfig field, then these."""
    options = [_config_option(f, edit) for f in config_fields()]
    options += [
        click.option(
            "--replace",
            is_flag=True,
            help="Overwrite an existing kernel of that name"
            + (" (when renaming)." if edit else "."),
        ),
        click.option(
            "--no-check",
            "-n",
            is_flag=True,
            help="Do not contact the remote host to validate.",
        ),
    ]
    if edit:
        options.append(
            click.option(
                "--unset-remote-env",
                multiple=True,
                metavar="KEY",
                help="Remove a variable from the remote environment (repeatable).",
            )
        )

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--remote-env")
        env[key] = value
    return env


async def _inspect(
    alias: str,
    ssh_config: str | None,
    python: str,
    kernel: str,
    pre: str | None,
    slurm_args: list[str] | None = None,
) -> dict[str, Any]:
    async with await SSHSession.connect(alias, ssh_config=ssh_config, connect_timeout=20) as s:
        info = await asyncio.wait_for(s.inspect(python, kernel, pre), 30)
        if slurm_args is not None:
            # srun on the login node, and `srun --test-only` accepting the job options
            agent = await s.agent(python, pre)
            info["slurm"] = await asyncio.wait_for(agent.slurm_info(slurm_args), 30)
        return info


def _inspect_spec(spec: SSHKernelSpec) -> dict[str, Any]:
    return run(
        _inspect(
            spec.ssh_host_alias,
            spec.ssh_config,
            spec.remote_python,
            spec.remote_kernel_name,
            spec.pre_command,
            parse_slurm_args(spec.slurm_args) if spec.launcher == "slurm" else None,
        )
    )


@main.command()
@_spec_options(edit=False)
def add(**opts: Any) -> None:
    """Add a new SSH kernel.

    Connects to the host to check the remote python and kernelspec (and, with
    --launcher slurm, that srun accepts --slurm-args) unless --no-check, and writes
    kernel.json into your Jupyter data dir.
    """
    given: dict[str, Any] = {
        f.name: _parse_env(opts[f.name]) if f.type is dict else opts[f.name]
        for f in config_fields()
        if opts[f.name] not in (None, ()) and not (f.option.from_remote and opts[f.name] == "")
    }
    spec = SSHKernelSpec(**given)
    spec.validate()
    if not opts["no_check"]:
        remote = _inspect_spec(spec).get("kernelspec") or {}
        if remote.get("display_name"):
            remote["display_name"] = f"{remote['display_name']} ({spec.ssh_host_alias})"
        for f in config_fields():
            if f.option.from_remote and f.name not in given and remote.get(f.name):
                setattr(spec, f.name, remote[f.name])
    path = write_spec(spec, replace=opts["replace"])
    click.echo(f"Added kernel {spec.name!r} ({spec.display_name or spec.name}) in {path}")


@main.command()
@click.argument("kernel", metavar="KERNEL_NAME", shell_complete=_complete_kernels(True))
@_spec_options(edit=True)
def edit(kernel: str, **opts: Any) -> None:
    """Change an SSH kernel: every option of `add` sets that field.

    Validates against the remote host when the host, ssh config, remote python,
    remote kernel name, pre-command, launcher or SLURM arguments change (unless
    --no-check).
    """
    old = find_kernel(kernel).spec
    # every KernelConfig field has its option; the remote env is merged, not replaced
    changes = {f.name: opts[f.name] for f in config_fields() if f.type is not dict}
    spec = edited_spec(
        old,
        changes,
        set_env=_parse_env(opts["remote_env"]),
        unset_env=opts["unset_remote_env"],
    )
    diff = spec_changes(old, spec)
    if not diff:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    if not opts["no_check"] and any(config_field(name).option.checked for name, _, _ in diff):
        _inspect_spec(spec)
    path = save_edited_spec(old, spec, replace=opts["replace"])
    click.echo(f"Updated kernel {spec.name!r} in {path}:")
    for name, before, after in diff:
        click.echo(f"  {name}: {before!r} -> {after!r}")


# -- delete ----------------------------------------------------------------------------


@main.command()
@click.argument(
    "kernels",
    metavar="KERNEL_NAME...",
    nargs=-1,
    required=True,
    shell_complete=_complete_kernels(False),
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", "-f", is_flag=True, help="Also delete kernels that are not SSH kernels.")
def delete(kernels: tuple[str, ...], yes: bool, force: bool) -> None:
    """Delete kernels (their whole kernel directory).

    Refuses kernels that are not SSH kernels unless --force. Nothing is deleted if
    any name is unknown or refused.
    """
    found: list[InstalledKernel] = []
    for name in dict.fromkeys(kernels):
        kernel = find_kernel(name)
        if not kernel.is_ssh and not force:
            raise SSHPykError(
                f"kernel {name!r} is not an SSH kernel: use --force to delete it anyway"
            )
        found.append(kernel)
    listing = ", ".join(f"{k.name} ({k.resource_dir})" for k in found)
    if not yes:
        click.confirm(f"Delete {listing}?", abort=True)
    for kernel in found:
        delete_spec(kernel)
        click.echo(f"Deleted kernel {kernel.name!r} ({kernel.resource_dir})")


# -- check -----------------------------------------------------------------------------

_TITLE_WIDTH = max(len(title) for _, title in (*STAGES, SLURM_STAGE))


def _stage_line(obj: Context, result: StageResult) -> str:
    seconds = "" if result.seconds is None else f"{result.seconds:.3f}s"
    line = f"{obj.mark(result.status)} {result.title:<{_TITLE_WIDTH}} {seconds:>8}  {result.detail}"
    if result.fix:
        line += f"\n    fix: {result.fix}"
    return line


@main.command(short_help="Diagnose a host or an SSH kernel, stage by stage.")
@click.argument("target", metavar="ALIAS|KERNEL_NAME", shell_complete=_complete_check_target)
@click.option("--ssh-config", type=click.Path(dir_okay=False), help="ssh config file.")
@click.option("--remote-python", help="Remote python (default: the kernel's, else python3).")
@click.option(
    "--remote-kernel-name", help="Remote kernelspec (default: the kernel's, else python3)."
)
@click.option("--pre-command", help="Shell code run on the remote first.")
@click.option("--transport", type=click.Choice(TRANSPORTS), help="Transport of the test kernel.")
@click.option("--no-kernel", is_flag=True, help="Skip starting a test kernel.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds allowed per stage.",
)
@click.option("--json", "as_json", is_flag=True, help="The stages as JSON.")
@pass_obj
def check(obj: Context, target: str, **opts: Any) -> None:
    """Diagnose a host or an SSH kernel, stage by stage, with a fix for each failure.

    Stages: config resolution, TCP connect, host key, authentication, remote python,
    jupyter_client, remote kernelspec, TCP forwarding, ipc (unix sockets), SLURM on the
    login node (SLURM kernels only), and a test kernel started and answering (for a
    SLURM kernel, a real job). A KERNEL_NAME of an installed SSH kernel checks its
    settings; anything else is taken as a host alias. Exits 1 if a stage failed.
    """
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


def _aliases_for(ssh_config: str | None) -> list[str]:
    try:
        return host_aliases(config_path(ssh_config))
    except SSHPykError:
        return []


# -- ps / kill -------------------------------------------------------------------------


def _targets(
    aliases: tuple[str, ...], ssh_config: str | None, python: str | None, run_root: str | None
) -> list[HostTarget]:
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


def _host_options(func: Callable[..., Any]) -> Callable[..., Any]:
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


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


_ALL_USERS_HELP = (
    "As root on the remote, act on every user's kernels (default: only the remote user's own)."
)


@main.command(short_help="List the kernels sshpyk started on hosts.")
@click.argument("aliases", metavar="[ALIAS]...", nargs=-1, shell_complete=_complete_aliases)
@_host_options
@click.option("--json", "as_json", is_flag=True, help="Full details as JSON.")
@click.option("--all-users", is_flag=True, help=_ALL_USERS_HELP)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds each host has to answer (a silent host is then reported as an error).",
)
def ps(
    aliases: tuple[str, ...],
    ssh_config: str | None,
    remote_python: str | None,
    run_root: str | None,
    as_json: bool,
    all_users: bool,
    timeout: float,
) -> None:
    """List the kernels sshpyk started on hosts (default: every host of an SSH kernel).

    LOCAL OWNER is "alive" while the local process that started the kernel is still
    heard from, "gone" for orphans (see `sshpyk kill --orphans`). Kernels started with
    --launcher slurm add JOB ID, NODE and JOB STATE (from squeue; PID is srun's).
    """
    targets = _targets(aliases, ssh_config, remote_python, run_root)
    hosts = run(ps_hosts(targets, timeout=timeout, all_users=all_users))
    if as_json:
        click.echo(json.dumps({"hosts": [h.as_dict() for h in hosts]}, indent=2))
    else:
        rows = ps_table(hosts)
        if len(rows) > 1:
            _print_table(rows)
        for host in hosts:
            if not host.error and not host.kernels:
                click.echo(f"No sshpyk kernels on {host.alias}.")
    _fail_hosts(hosts)


def _fail_hosts(hosts: list[HostKernels]) -> None:
    failed = [h for h in hosts if h.error]
    for host in failed[:-1]:
        click.echo(f"Error: {host.error}", err=True)
    if failed:
        raise click.ClickException(str(failed[-1].error))


@main.command()
@click.argument("alias", metavar="ALIAS", shell_complete=_complete_aliases)
@click.argument("kernel_ids", metavar="[KERNEL_ID]...", nargs=-1)
@click.option("--orphans", is_flag=True, help="Kill every kernel whose local owner is gone.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--all-users", is_flag=True, help=_ALL_USERS_HELP)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds the host has to answer (for the listing, then for the kill).",
)
@_host_options
def kill(
    alias: str,
    kernel_ids: tuple[str, ...],
    orphans: bool,
    yes: bool,
    all_users: bool,
    timeout: float,
    ssh_config: str | None,
    remote_python: str | None,
    run_root: str | None,
) -> None:
    """Stop kernels sshpyk started on ALIAS and remove their run dirs.

    Give kernel ids (or unique prefixes, see `sshpyk ps`), or --orphans. Kernels that
    could not be killed are reported on stderr, and the exit code is then 1.
    """
    if bool(kernel_ids) == orphans:
        raise click.UsageError("give KERNEL_ID(s) or --orphans (not both)")
    # one alias may be used with several ssh configs: the first (or --ssh-config) wins
    target = _targets((alias,), ssh_config, remote_python, run_root)[0]
    if not yes:
        (host,) = run(ps_hosts([target], timeout=timeout, all_users=all_users))
        _fail_hosts([host])
        if orphans:
            chosen = [k for k in host.kernels if not k.get("attached")]
            if not chosen:
                click.echo(f"No orphaned kernels on {alias}.")
                return
        else:
            chosen = [
                k
                for k in host.kernels
                if any(str(k["kernel_id"]).startswith(i) for i in kernel_ids)
            ]
        if chosen:
            _print_table(ps_table([HostKernels(alias, chosen)]))
            owned = sum(bool(k.get("attached")) for k in chosen)
            warning = f" ({owned} still in use by a live owner)" if owned else ""
            click.confirm(f"Kill {len(chosen)} kernel(s) on {alias}{warning}?", abort=True)
    if orphans:
        killed = run(kill_orphans(target, all_users=all_users, timeout=timeout))
        if not killed:
            click.echo(f"No orphaned kernels on {alias}.")
    else:
        killed = run(kill_kernels(target, kernel_ids, all_users=all_users, timeout=timeout))
    failed = 0
    for k in killed:
        reason = kill_failed(k)
        if reason is not None:
            failed += 1
            click.echo(f"Could not kill kernel {k.get('kernel_id')} on {alias}: {reason}", err=True)
            continue
        job = f"; cancelled SLURM job {k['job_id']}" if k.get("job_id") else ""
        click.echo(
            f"Killed kernel {k.get('kernel_id')} ({k.get('kernel_name')}, pid {k.get('pid')}) "
            f"on {alias}; removed {k.get('run_dir')}{job}"
        )
    if failed:
        raise click.exceptions.Exit(1)


@main.command(short_help="Forward a running remote kernel to local ports.")
@click.argument("alias", metavar="ALIAS", shell_complete=_complete_aliases)
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
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds allowed to find and attach the kernel (not for the forwarding itself).",
)
@_host_options
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
    target = _targets((alias,), ssh_config, remote_python, run_root)[0]

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog_name="sshpyk"))
