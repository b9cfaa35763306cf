"""``sshpyk add``, ``edit`` and ``delete``: SSH kernelspecs. The options of ``add`` and
``edit`` are generated from :class:`~sshpyk.config.KernelConfig`'s fields."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from ..config import ConfigField, config_field, config_fields
from ..diagnostics.discover import DISCOVER_TIMEOUT
from ..errors import SSHPykError
from ..kernels.kernel import KernelOptions
from ..kernels.launcher import launcher_for
from ..kernels.session import SSHSession
from ..kernelspec import (
    InstalledKernel,
    SSHKernelSpec,
    delete_spec,
    edited_spec,
    find_kernel,
    save_edited_spec,
    spec_changes,
    write_spec,
)
from .common import complete_aliases, complete_kernels, run
from .discover import FOUND_FIELDS, add_discovered, discover_options, find_on_host

__all__ = ["add", "delete", "edit"]


#: the options of ``add`` that only ``--discover`` reads (--select aside: "" is given)
_DISCOVERY_ONLY = ("add_all", "search", "search_only", "as_json")


class _NeededOption(click.Option):
    """A required option of ``add``, but with ``--discover`` (which finds its value).
    Click processes the options given before those left out, so ``--discover`` is
    known when a left-out one is checked."""

    @property  # type: ignore[override]
    def required(self) -> bool:
        ctx = click.get_current_context(silent=True)
        return self._required and not (ctx is not None and ctx.params.get("discover"))

    @required.setter
    def required(self, value: bool) -> None:
        self._required = value


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
    elif f.type is list:
        kw["multiple"] = True
        kw["help"] += " Replaces what is stored; an empty value clears it." if edit else ""
    else:
        if opt.choices:
            kw["type"] = click.Choice(opt.choices)
        elif f.type in (float, int):
            kw["type"] = f.type
        elif opt.path and not edit:
            kw["type"] = click.Path(dir_okay=False)
        if not edit and opt.required and not f.default:
            kw.update(required=True, cls=_NeededOption)
        elif not edit and not opt.from_remote and f.default not in (None, ""):
            kw.update(default=f.default, show_default=True)
    if f.name == "ssh_host_alias":
        kw["shell_complete"] = complete_aliases
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


def _given(f: ConfigField, value: Any) -> Any:
    """An ``add`` option's value as the config field takes it."""
    if f.type is dict:
        return _parse_env(value)
    if f.type is list:
        return [v for v in value if v]
    return value


def _edited(f: ConfigField, value: Any) -> Any:
    """An ``edit`` option's value as a change (None: not given); a list option given
    only empty values clears the list."""
    if f.type is list:
        return [v for v in value if v] if value else None
    return value


async def _inspect(spec: SSHKernelSpec) -> dict[str, Any]:
    """The remote python's facts and kernelspec, and the launcher's check of the host
    (a batch scheduler: accepting the job options), or an SSHPykError."""
    async with await SSHSession.connect(
        spec.ssh_host_alias,
        ssh_config=spec.ssh_config,
        connect_timeout=20,
        persist=spec.connection_persist,
    ) as s:
        python, pre = spec.remote_python, spec.pre_command
        info = await asyncio.wait_for(s.inspect(python, spec.remote_kernel_name, pre), 30)
        launcher = launcher_for(spec.launcher)
        agent = await s.agent(python, pre)
        options = KernelOptions.from_config(spec)
        info[launcher.name] = await asyncio.wait_for(launcher.check_host(agent, options), 30)
        return info


def _inspect_spec(spec: SSHKernelSpec) -> dict[str, Any]:
    return run(_inspect(spec))


@click.command()
@_spec_options(edit=False)
@click.option(
    "--discover",
    metavar="HOST",
    shell_complete=complete_aliases,
    help="Find the Pythons with jupyter_client on HOST and their kernelspecs (conda,"
    " mamba and micromamba envs, virtualenvs, pyenv, the PATH's python3) and show them;"
    " with --all or --select, add kernels for them. The other options apply to every"
    " kernel added; --remote-python is the python that looks.",
)
@click.option("--all", "add_all", is_flag=True, help="With --discover: add every kernel found.")
@click.option(
    "--select",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="NUMBERS",
    help="With --discover: add the kernels of these numbers of the table (e.g. 1,3-4);"
    " alone, it asks.",
)
@discover_options
@click.option("--json", "as_json", is_flag=True, help="With --discover: the result as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DISCOVER_TIMEOUT,
    help=f"With --discover: seconds the host has to look, then what it found so far"
    f" (default {DISCOVER_TIMEOUT:g}).",
)
@click.pass_context
def add(ctx: click.Context, **opts: Any) -> None:
    """Add a new SSH kernel, or those of a host's environments (--discover HOST).

    Connects to the host to check the remote python and kernelspec (and, with
    a batch launcher, that its scheduler accepts the job arguments) unless --no-check, and writes
    kernel.json into your Jupyter data dir.
    """
    if opts["discover"] is not None:
        _add_discovered(ctx, opts)
        return
    if opts["select"] is not None or any(opts[k] for k in _DISCOVERY_ONLY):
        raise click.UsageError(
            "--all, --select, --search, --search-only and --json need --discover HOST"
        )
    given: dict[str, Any] = {
        f.name: _given(f, opts[f.name])
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


def _add_discovered(ctx: click.Context, opts: dict[str, Any]) -> None:
    """``add --discover``: what the host offers; with --all/--select, added."""
    clash = [
        f.flag
        for f in config_fields()
        if f.name in FOUND_FIELDS
        and f.name != "remote_python"
        and ctx.get_parameter_source(f.name) is ParameterSource.COMMANDLINE
    ]
    if clash:
        raise click.UsageError(f"{', '.join(clash)}: not with --discover (found on the host)")
    base = {
        f.name: _given(f, opts[f.name])
        for f in config_fields()
        if f.name not in FOUND_FIELDS and opts[f.name] not in (None, ())
    }
    discovery = find_on_host(
        opts["discover"],
        ssh_config=opts["ssh_config"],
        python=opts["remote_python"],
        pre_command=opts["pre_command"],
        search=opts["search"],
        search_only=opts["search_only"],
        timeout=opts["timeout"],
    )
    add_discovered(
        discovery,
        select=opts["select"],
        add_all=opts["add_all"],
        base=base,
        as_json=opts["as_json"],
    )


@click.command()
@click.argument("kernel", metavar="KERNEL_NAME", shell_complete=complete_kernels(True))
@_spec_options(edit=True)
def edit(kernel: str, **opts: Any) -> None:
    """Change an SSH kernel: every option of `add` sets that field.

    Validates against the remote host when the host, ssh config, remote python,
    remote kernel name, pre-command, launcher or job arguments change (unless
    --no-check).
    """
    old = find_kernel(kernel).spec
    # every KernelConfig field has its option; the remote env is merged, not replaced
    changes = {f.name: _edited(f, opts[f.name]) for f in config_fields() if f.type is not dict}
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


@click.command()
@click.argument(
    "kernels",
    metavar="KERNEL_NAME...",
    nargs=-1,
    required=True,
    shell_complete=complete_kernels(False),
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
