"""`sshpyk check`: every stage with its duration, a fix for each failure, exit codes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sshpyk.diagnostics.check import STAGES

from support.cli import silent_host, sshpyk

pytestmark = pytest.mark.timeout(120)

TITLES = dict(STAGES)


def stages(result: Any) -> dict[str, dict[str, Any]]:
    data = json.loads(result.stdout)
    assert [s["stage"] for s in data["stages"]] == [key for key, _ in STAGES]
    return {s["stage"]: s for s in data["stages"]}


def statuses(found: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {key: stage["status"] for key, stage in found.items()}


def check_json(*args: str) -> tuple[Any, dict[str, dict[str, Any]]]:
    result = sshpyk("check", "--json", *args)
    return result, stages(result)


def test_check_kernel_all_stages_pass(sshd, make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_ok")
    started = time.monotonic()
    result = sshpyk("check", "ssh_ok")
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 30
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"Checking kernel 'ssh_ok' on host '{sshd.alias}'")
    assert lines[-1].startswith("All checks passed in ")
    stage_lines = lines[1:-1]
    assert len(stage_lines) == len(STAGES)
    for line, (_, title) in zip(stage_lines, STAGES, strict=True):
        assert line.startswith(f"(v) {title}"), line
        assert line.split()[-1] != "s" and "s  " in line  # a duration per stage
    text = result.stdout
    assert f"HostName 127.0.0.1, User {sshd.user}, Port {sshd.port}, no ProxyJump" in text
    assert "ssh-ed25519 SHA256:" in text
    assert f"logged in as {sshd.user}" in text
    assert "jupyter_client 8." in text or "jupyter_client 9." in text
    assert "ipc transport" in text and "answered kernel_info" in text
    no_leftovers()  # the test kernel and the ipc probe clean up after themselves


def test_check_alias_json_without_kernel(sshd) -> None:
    result, found = check_json(
        sshd.alias,
        "--ssh-config",
        str(sshd.ssh_config),
        "--remote-python",
        sys.executable,
        "--no-kernel",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["alias"] == sshd.alias and data["kernel"] is None
    assert found["kernel"]["status"] == "skip"
    assert all(found[k]["status"] == "ok" for k, _ in STAGES[:-1]), found
    assert all(isinstance(found[k]["seconds"], float) for k, _ in STAGES[:-1])


@pytest.mark.parametrize(
    ("alias", "failed", "fragments"),
    [
        ("sshpyk-refused", "tcp", ("connection refused", "start sshd there")),
        ("no-such-alias-sshpyk", "tcp", ("unknown host", "Host no-such-alias-sshpyk")),
        ("sshpyk-badauth", "auth", ("authentication failed", "ssh-copy-id")),
        ("sshpyk-badhostkey", "hostkey", ("known_hosts", "ssh-keygen -R '[127.0.0.1]:")),
    ],
)
def test_check_connection_failures(
    sshd, alias: str, failed: str, fragments: tuple[str, ...]
) -> None:
    started = time.monotonic()
    result, found = check_json(alias, "--ssh-config", str(sshd.ssh_config))
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    order = [key for key, _ in STAGES]
    before, after = order[: order.index(failed)], order[order.index(failed) + 1 :]
    assert found[failed]["status"] == "fail"
    assert all(found[k]["status"] in ("ok", "warn") for k in before), found
    assert all(found[k]["status"] == "skip" for k in after), found
    text = found[failed]["detail"] + " " + found[failed]["fix"]
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert result.stderr.startswith(f"Error: check failed at {TITLES[failed]}: ")
    assert len(result.stderr.splitlines()) == 1


def test_check_text_output_of_a_failure(sshd) -> None:
    result = sshpyk("check", "sshpyk-refused", "--ssh-config", str(sshd.ssh_config))
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[1].startswith("(v) config resolution")
    assert lines[2].startswith("(x) TCP connect")
    assert lines[3].startswith("    fix: nothing listens on 127.0.0.1:")
    assert all(line.startswith("(-) ") and "skipped" in line for line in lines[4:])
    assert result.stderr == (
        "Error: check failed at TCP connect: connection refused by 'sshpyk-refused' "
        f"(ssh config {sshd.ssh_config}): is sshd running and is the Port right?\n"
    )


def test_check_unknown_alias_warns_at_config(sshd) -> None:
    _, found = check_json("no-such-alias-sshpyk", "--ssh-config", str(sshd.ssh_config))
    assert found["config"]["status"] == "warn"
    assert "is not a Host in" in found["config"]["detail"]


def test_check_missing_remote_python(sshd, make_kernelspec) -> None:
    make_kernelspec("ssh_nopy", remote_python="/nonexistent/bin/python3")
    result, found = check_json("ssh_nopy")
    assert result.exit_code == 1
    assert statuses(found)["auth"] == "ok"
    assert found["python"]["status"] == "fail"
    assert "/nonexistent/bin/python3" in found["python"]["detail"]
    assert "`sshpyk edit ssh_nopy --remote-python /path/to/env`" in found["python"]["fix"]
    assert found["jupyter_client"]["status"] == "skip"
    # the same from the command line for an alias
    result, found = check_json(
        sshd.alias, "--ssh-config", str(sshd.ssh_config), "--remote-python", "no-such-python3"
    )
    assert found["python"]["status"] == "fail" and "--remote-python" in found["python"]["fix"]


def test_check_missing_remote_kernelspec(sshd, make_kernelspec) -> None:
    make_kernelspec("ssh_nokernel", remote_kernel_name="no_such_kernel")
    result, found = check_json("ssh_nokernel")
    assert result.exit_code == 1
    assert found["python"]["status"] == "ok" and found["jupyter_client"]["status"] == "ok"
    assert found["kernelspec"]["status"] == "fail"
    assert "available: " in found["kernelspec"]["detail"]
    assert "sshpyk edit ssh_nokernel --remote-kernel-name" in found["kernelspec"]["fix"]


def test_check_missing_jupyter_client(sshd, tmp_path: Path) -> None:
    """A python without jupyter_client: a venv without system site-packages."""
    import venv

    env = tmp_path / "bare-env"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env)
    result, found = check_json(
        sshd.alias, "--ssh-config", str(sshd.ssh_config), "--remote-python", str(env)
    )
    assert result.exit_code == 1
    assert found["python"]["status"] == "ok"
    assert found["jupyter_client"]["status"] == "fail"
    assert "pip install jupyter_client" in found["jupyter_client"]["fix"]


def test_check_forwarding_refused(sshd_nofwd) -> None:
    config = str(sshd_nofwd.ssh_config)
    result, found = check_json(
        sshd_nofwd.alias, "--ssh-config", config, "--remote-python", sys.executable
    )
    assert result.exit_code == 1
    # ipykernel: auto picks ipc, so refused TCP forwarding is only a warning
    assert found["forwarding"]["status"] == "warn"
    assert "AllowTcpForwarding yes" in found["forwarding"]["fix"]
    assert found["ipc"]["status"] == "fail"
    assert "AllowStreamLocalForwarding yes" in found["ipc"]["fix"]
    assert found["kernel"]["status"] == "fail"
    assert "refuses unix socket forwarding" in found["kernel"]["detail"]
    _, found = check_json(
        sshd_nofwd.alias,
        "--ssh-config",
        config,
        "--remote-python",
        sys.executable,
        "--transport",
        "tcp",
        "--no-kernel",
    )
    assert found["forwarding"]["status"] == "fail"
    assert found["ipc"]["status"] == "warn"  # not needed for tcp


def test_check_kernel_that_cannot_start(sshd, make_kernelspec, no_leftovers) -> None:
    make_kernelspec("ssh_badcwd", remote_cwd="/nonexistent/dir")
    result, found = check_json("ssh_badcwd")
    assert result.exit_code == 1
    assert found["kernel"]["status"] == "fail"
    assert "/nonexistent/dir" in found["kernel"]["detail"]
    assert "sshpyk edit ssh_badcwd --remote-cwd" in found["kernel"]["fix"]
    no_leftovers()


def test_check_silent_host_is_bounded(sshd, tmp_path) -> None:
    with silent_host(sshd, tmp_path) as config:
        started = time.monotonic()
        result, found = check_json("sshpyk-silent", "--ssh-config", str(config), "--timeout", "2")
        assert time.monotonic() - started < 8
    assert result.exit_code == 1
    assert found["tcp"]["status"] == "ok"
    assert found["hostkey"]["status"] == "fail"
    assert "within 2s" in found["hostkey"]["detail"]
    assert "is it an sshd" in found["hostkey"]["fix"]


def test_check_refuses_local_kernels(isolated_jupyter) -> None:
    path = isolated_jupyter / "kernels" / "loc"
    path.mkdir(parents=True)
    (path / "kernel.json").write_text(json.dumps({"argv": ["x"], "display_name": "L"}))
    result = sshpyk("check", "loc")
    assert result.exit_code == 1
    assert result.stderr == "Error: kernel 'loc' is not an SSH kernel: nothing to check remotely\n"
