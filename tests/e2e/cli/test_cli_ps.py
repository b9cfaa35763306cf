"""`sshpyk ps` and `sshpyk kill` against kernels another local process started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.localfs import BROKER_DIR_ENV
from sshpyk.ssh.brokered import PERSIST_ENV

from support.broker import broker_pid, temp_broker_dir
from support.cli import KernelOwner, assert_one_line_error, sshpyk
from support.waiting import pid_alive, wait_until

pytestmark = pytest.mark.timeout(120)


NO_BROKER = "Connection broker: none running (each process connects by itself)."


def host_args(sshd, run_root) -> list[str]:
    return [sshd.alias, "--ssh-config", str(sshd.ssh_config), "--run-root", str(run_root)]


def ps_json(sshd, run_root) -> list[dict[str, Any]]:
    result = sshpyk("ps", "--json", *host_args(sshd, run_root))
    assert result.exit_code == 0, result.output
    (host,) = json.loads(result.stdout)["hosts"]
    assert host["alias"] == sshd.alias and host["error"] is None
    return host["kernels"]


@pytest.fixture
def owner(sshd, run_root):
    owner = KernelOwner(sshd, run_root)
    yield owner
    owner.stop()


def test_ps_shows_a_kernel_and_its_live_owner(sshd, run_root, owner) -> None:
    result = sshpyk("ps", *host_args(sshd, run_root))
    assert result.exit_code == 0, result.output
    header, *rows, broker = result.stdout.splitlines()
    assert header.split() == (
        "HOST KERNEL ID NAME PID STARTED LAST CONTACT LOCAL OWNER STATE "
        "CPU MEM GPU IDLE CLIENT PORTS".split()
    )
    assert broker == NO_BROKER  # the suite's processes connect by themselves
    (row,) = rows
    assert row.split()[:4] == [sshd.alias, owner.kernel_id, "python3", str(owner.pid)]
    assert row.split()[-2:] == ["api", "-"]  # started with the API; no web ports
    assert "alive" in row.split() and "running" in row.split()
    assert "s ago" in row
    (kernel,) = ps_json(sshd, run_root)
    assert kernel["kernel_id"] == owner.kernel_id and kernel["pid"] == owner.pid
    assert kernel["attached"] is True and kernel["alive"] is True
    assert kernel["client"] == "api" and kernel["forwarded"] == []
    assert kernel["run_dir"].startswith(str(run_root))
    assert abs(kernel["started"] - time.time()) < 120
    assert time.time() - kernel["last_contact"] < 30


def test_ps_without_kernels(sshd, run_root) -> None:
    result = sshpyk("ps", *host_args(sshd, run_root))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"No sshpyk kernels on {sshd.alias}.\n{NO_BROKER}\n"


def test_ps_shows_the_connection_broker(sshd, run_root) -> None:
    """With connection sharing on, ps connects through the broker and says so: its pid,
    the connection it holds and the processes using it (this one)."""
    with temp_broker_dir() as bdir:
        env = {BROKER_DIR_ENV: str(bdir), PERSIST_ENV: "2"}
        result = sshpyk("ps", *host_args(sshd, run_root), env=env)
        assert result.exit_code == 0, result.output
        pid = broker_pid(bdir)
        assert pid is not None
        last = result.stdout.splitlines()[-1]
        assert last.startswith(f"Connection broker: pid {pid}, started "), last
        # ps itself has closed its session by now: the connection waits for the next
        assert f"{sshd.alias} (up, idle, kept 2s)" in last, last
        data = json.loads(sshpyk("ps", "--json", *host_args(sshd, run_root), env=env).stdout)
        assert data["broker"]["pid"] == pid
        assert [c["alias"] for c in data["broker"]["connections"]] == [sshd.alias]


def test_ps_defaults_to_the_hosts_of_installed_kernels(
    sshd, run_root, owner, make_kernelspec
) -> None:
    make_kernelspec("ssh_ps")  # its remote_run_root is run_root: ps searches there
    result = sshpyk("ps")
    assert result.exit_code == 0, result.output
    assert owner.kernel_id in result.stdout
    make_kernelspec("ssh_down", ssh_host_alias="sshpyk-refused")
    result = sshpyk("ps")
    assert result.exit_code == 1
    assert owner.kernel_id in result.stdout  # the healthy host is still listed
    assert_one_line_error(result, "connection refused by 'sshpyk-refused'")


def test_ps_without_any_host_is_a_usage_error(isolated_jupyter) -> None:
    result = sshpyk("ps")
    assert result.exit_code == 2 and "name a host" in result.stderr


def test_kill_by_id_prefix_with_confirmation(sshd, run_root, owner, no_leftovers) -> None:
    prefix, args = owner.kernel_id[:8], host_args(sshd, run_root)[1:]
    result = sshpyk("kill", sshd.alias, prefix, *args, input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert "1 still in use by a live owner" in result.output
    assert pid_alive(owner.pid)
    result = sshpyk("kill", sshd.alias, prefix, *args, input="y\n")
    assert result.exit_code == 0, result.output
    assert (
        f"Killed kernel {owner.kernel_id} (python3, pid {owner.pid}) on {sshd.alias}"
        in result.stdout
    )
    assert wait_until(lambda: not pid_alive(owner.pid), 10)
    assert ps_json(sshd, run_root) == []
    owner.stop()  # its agent saw the kernel die; closing still works
    no_leftovers()


def test_kill_errors(sshd, run_root, owner) -> None:
    args = host_args(sshd, run_root)[1:]
    assert_one_line_error(
        sshpyk("kill", sshd.alias, "ffffffff", "--yes", *args), "no sshpyk kernel 'ffffffff'"
    )
    assert pid_alive(owner.pid)
    result = sshpyk("kill", sshd.alias, *args)
    assert result.exit_code == 2 and "KERNEL_ID(s) or --orphans" in result.stderr
    result = sshpyk("kill", sshd.alias, owner.kernel_id, "--orphans", *args)
    assert result.exit_code == 2
    # nothing orphaned: the owner is alive
    result = sshpyk("kill", sshd.alias, "--orphans", *args)
    assert result.exit_code == 0 and result.stdout == f"No orphaned kernels on {sshd.alias}.\n"
    result = sshpyk("kill", sshd.alias, "--orphans", "--yes", *args)
    assert result.exit_code == 0 and result.stdout == f"No orphaned kernels on {sshd.alias}.\n"
    assert pid_alive(owner.pid)


@pytest.mark.slow
def test_kill_orphans(sshd, run_root, no_leftovers) -> None:
    """A kernel whose agent stopped answering turns orphan once its owner was not heard
    from for max(grace, 15) s; `kill --orphans` then kills it and removes its run dir.

    The agent is SIGSTOPped (a hung agent): with a SIGKILLed owner the agent itself
    stops non-persistent kernels when the grace period ends, before they count as
    orphans (see the report on the `attached` semantics).
    """
    owner = KernelOwner(sshd, run_root, grace=1.0)
    (kernel,) = ps_json(sshd, run_root)
    agent_pid = int(kernel["agent_pid"])
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        owner.sigkill()
        assert wait_until(lambda: not ps_json(sshd, run_root)[0]["attached"], 40, step=1.0)
        result = sshpyk("ps", *host_args(sshd, run_root))
        row = result.stdout.splitlines()[1].split()
        assert {"gone", "running"} <= set(row) and row[-2:] == ["api", "-"]
        result = sshpyk(
            "kill", sshd.alias, "--orphans", *host_args(sshd, run_root)[1:], input="y\n"
        )
        assert result.exit_code == 0, result.output
        assert f"Killed kernel {owner.kernel_id}" in result.stdout
        assert wait_until(lambda: not pid_alive(owner.pid), 10)
        assert ps_json(sshd, run_root) == []
    finally:
        os.kill(agent_pid, signal.SIGCONT)
        owner.stop()
    assert wait_until(lambda: not pid_alive(agent_pid), 20)  # nothing left to serve
    no_leftovers()


def test_kill_reports_a_failure_as_a_failure(sshd, run_root) -> None:
    """Two kernels killed at once: one goes; the other's run dir cannot be removed (a
    busy mount point in it, as root) and is reported on stderr with the reason; exit 1."""
    good, bad = KernelOwner(sshd, run_root), KernelOwner(sshd, run_root)
    busy: Path | None = None
    try:
        dirs = {k["kernel_id"]: k["run_dir"] for k in ps_json(sshd, run_root)}
        busy = Path(dirs[bad.kernel_id]) / "busy"
        busy.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "sshpyk-test", str(busy)], capture_output=True, timeout=10
        )
        if mounted.returncode != 0:
            busy = None
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
        args = host_args(sshd, run_root)[1:]
        result = sshpyk("kill", sshd.alias, good.kernel_id, bad.kernel_id, "--yes", *args)
        assert result.exit_code == 1, result.output
        assert result.stdout.splitlines() == [
            f"Killed kernel {good.kernel_id} (python3, pid {good.pid}) on {sshd.alias}; "
            f"removed {dirs[good.kernel_id]}"
        ], result.stdout
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"Could not kill kernel {bad.kernel_id} on {sshd.alias}: "), line
        assert str(busy) in line or dirs[bad.kernel_id] in line, line
        assert "Killed" not in result.stderr and "Traceback" not in result.output
        assert wait_until(lambda: not pid_alive(good.pid), 10)
        assert not Path(dirs[good.kernel_id]).exists()
        assert Path(dirs[bad.kernel_id]).exists()  # what could not be removed is still there
    finally:
        if busy is not None:
            subprocess.run(["umount", str(busy)], capture_output=True, timeout=10)
        good.stop()
        bad.stop()


def test_kill_and_ps_document_all_users() -> None:
    for command in ("kill", "ps"):
        result = sshpyk(command, "--help")
        assert result.exit_code == 0
        text = " ".join(result.stdout.split())
        assert "--all-users" in text and "every user's kernels" in text, text
        assert "only the remote user's own" in text, text
    assert "--timeout" in sshpyk("kill", "--help").stdout
