"""``sshpyk ps`` and ``sshpyk kill``: the kernels sshpyk started on hosts."""

from __future__ import annotations

import json

import click

from ..diagnostics.discover import printable
from ..diagnostics.inventory import (
    HostKernels,
    broker_line,
    forwarded,
    kill_failed,
    kill_kernels,
    kill_orphans,
    ps_hosts,
    ps_table,
)
from ..kernels.launcher import find_launcher
from ..ssh.brokered import broker_status
from .common import (
    ALL_USERS_HELP,
    complete_aliases,
    fail_hosts,
    host_options,
    print_table,
    run,
    targets,
    timeout_option,
)

__all__ = ["kill", "ports", "ps"]


@click.command(short_help="List the kernels sshpyk started on hosts.")
@click.argument("aliases", metavar="[ALIAS]...", nargs=-1, shell_complete=complete_aliases)
@host_options
@click.option("--json", "as_json", is_flag=True, help="Full details as JSON.")
@click.option("--all-users", is_flag=True, help=ALL_USERS_HELP)
@timeout_option("Seconds each host has to answer (a silent host is then reported as an error).")
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
    heard from, "gone" for orphans (see `sshpyk kill --orphans`). What each kernel
    costs, its whole process tree on the host: CPU (100% = one core, over the last
    second or since the previous ps), MEM (resident, the sum of its processes'), GPU
    (per GPU it holds memory on: index:memory and that GPU's utilisation; "-" without
    nvidia-smi). IDLE: since the last execute request or output. CLIENT: what started
    or attached it (provisioner, argv, attach, api). PORTS: the web ports
    forwarded to this machine, remote -> local (see `sshpyk ports`). Kernels started
    with a batch launcher add JOB ID, NODE and JOB STATE (from the scheduler; PID is
    the job step's). The last line is your connection broker (see README's
    "Connection sharing"): its pid and the connections it holds for your processes.
    """
    hosts = run(
        ps_hosts(
            targets(aliases, ssh_config, remote_python, run_root),
            timeout=timeout,
            all_users=all_users,
            usage=True,
        )
    )
    broker = broker_status()
    if as_json:
        for host in hosts:
            for kernel in host.kernels:
                kernel["forwarded"] = forwarded(kernel)
        data = {"hosts": [h.as_dict() for h in hosts], "broker": broker}
        click.echo(json.dumps(data, indent=2))
    else:
        rows = ps_table(hosts, usage=True)
        if len(rows) > 1:
            print_table(rows)
        for host in hosts:
            if not host.error and not host.kernels:
                click.echo(f"No sshpyk kernels on {host.alias}.")
        click.echo(broker_line(broker))
    fail_hosts(hosts)


@click.command(short_help="List the web ports of remote kernels forwarded here.")
@click.argument("which", metavar="[ALIAS|KERNEL_ID]", required=False)
@host_options
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
@timeout_option("Seconds each host has to answer (a silent host is then reported as an error).")
def ports(
    which: str | None,
    ssh_config: str | None,
    remote_python: str | None,
    run_root: str | None,
    as_json: bool,
    timeout: float,
) -> None:
    """List the web ports of remote kernels (TensorBoard, Dash, Dask dashboards...)
    forwarded to this machine, with the local URL to open.

    WHICH is a host alias (its kernels), or a kernel id or unique prefix (searched on
    every host of an SSH kernel); default: every kernel of every such host. A port
    whose LOCAL URL is "-" was found on the remote but no local process forwards it
    (its owner is gone, or --no-auto-forward).
    """
    known = {t.alias for t in targets((), ssh_config, remote_python, run_root)} if which else set()
    aliases = (which,) if which and which in known else ()
    hosts = run(ps_hosts(targets(aliases, ssh_config, remote_python, run_root), timeout=timeout))
    wanted = which if which and not aliases else None
    rows = []
    for host in hosts:
        for k in host.kernels:
            if wanted and not str(k.get("kernel_id")).startswith(wanted):
                continue
            for f in forwarded(k):
                rows.append({"host": host.alias, "kernel_id": k.get("kernel_id"), **f})
    if as_json:
        click.echo(json.dumps({"ports": rows}, indent=2))
    elif rows:
        table = [["HOST", "KERNEL ID", "REMOTE", "LOCAL URL", "HOW"]]
        for r in rows:
            how = "auto" if r.get("auto") else "--forward"
            table.append([r["host"], str(r["kernel_id"]), r["remote"], r.get("url") or "-", how])
        print_table(table)
    else:
        click.echo("No forwarded ports" + (f" for {which}." if which else "."))
    fail_hosts(hosts)


@click.command()
@click.argument("alias", metavar="ALIAS", shell_complete=complete_aliases)
@click.argument("kernel_ids", metavar="[KERNEL_ID]...", nargs=-1)
@click.option("--orphans", is_flag=True, help="Kill every kernel whose local owner is gone.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--all-users", is_flag=True, help=ALL_USERS_HELP)
@timeout_option("Seconds the host has to answer (for the listing, then for the kill).")
@host_options
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
    target = targets((alias,), ssh_config, remote_python, run_root)[0]
    if not yes:
        (host,) = run(ps_hosts([target], timeout=timeout, all_users=all_users))
        fail_hosts([host])
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
            print_table(ps_table([HostKernels(alias, chosen)]))
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
            click.echo(
                f"Could not kill kernel {printable(k.get('kernel_id'))} on {alias}:"
                f" {printable(reason)}",
                err=True,
            )
            continue
        launcher = find_launcher(k.get("launcher"))
        job = launcher.kill_note(k) if launcher else ""
        click.echo(
            f"Killed kernel {printable(k.get('kernel_id'))} ({printable(k.get('kernel_name'))},"
            f" pid {k.get('pid')}) on {alias}; removed {printable(k.get('run_dir'))}{job}"
        )
    if failed:
        raise click.exceptions.Exit(1)
