"""`sshpyk edit`: every flag of `add` changes the stored spec, and nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from sshpyk.cli.kernels import add
from sshpyk.config import config_fields
from sshpyk.kernelspec import load_spec

from support.cli import assert_one_line_error, sshpyk

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def base(make_kernelspec):
    return make_kernelspec(
        "ssh_edit",
        remote_env={"A": "1", "B": "x"},
        pre_command="true",
        remote_cwd="/tmp",
    )


def other_config(tmp_path: Path, sshd) -> str:
    path = tmp_path / "other_ssh_config"
    path.write_text(sshd.ssh_config.read_text())
    return str(path)


#: (add/edit flag, arguments, field, expected value); "{other_config}" is filled in
EDITS: list[tuple[str, list[str], str, Any]] = [
    ("--ssh-host-alias", ["--ssh-host-alias", "elsewhere"], "ssh_host_alias", "elsewhere"),
    ("--display-name", ["--display-name", "New name"], "display_name", "New name"),
    ("--language", ["--language", "julia"], "language", "julia"),
    ("--ssh-config", ["--ssh-config", "{other_config}"], "ssh_config", "{other_config}"),
    ("--remote-python", ["--remote-python", "/opt/py"], "remote_python", "/opt/py"),
    ("--remote-kernel-name", ["--remote-kernel-name", "ir"], "remote_kernel_name", "ir"),
    ("--start-timeout", ["--start-timeout", "12.5"], "start_timeout", 12.5),
    ("--transport", ["--transport", "tcp"], "transport", "tcp"),
    ("--interrupt-mode", ["--interrupt-mode", "message"], "interrupt_mode", "message"),
    (
        "--remote-env",
        ["--remote-env", "A=2", "--remote-env", "C=a=b"],
        "remote_env",
        {"A": "2", "B": "x", "C": "a=b"},
    ),
    ("--pre-command", ["--pre-command", "module load cuda"], "pre_command", "module load cuda"),
    ("--remote-cwd", ["--remote-cwd", "/srv"], "remote_cwd", "/srv"),
    ("--remote-run-root", ["--remote-run-root", "/scratch/me"], "remote_run_root", "/scratch/me"),
    ("--grace-period", ["--grace-period", "600"], "grace_period", 600.0),
    ("--link-grace", ["--link-grace", "7200"], "link_grace", 7200.0),
    ("--connection-persist", ["--connection-persist", "0"], "connection_persist", 0.0),
    ("--outage-buffer", ["--outage-buffer", "8"], "outage_buffer", 8.0),
    ("--prestart", ["--prestart", "2"], "prestart", 2),
    ("--idle-timeout", ["--idle-timeout", "7200"], "idle_timeout", 7200.0),
    ("--persistent", ["--persistent"], "persistent", True),
    ("--launcher", ["--launcher", "slurm"], "launcher", "slurm"),
    (
        "--slurm-args",
        ["--slurm-args", "--partition=gpu --gres=gpu:1 --time=04:00:00"],
        "slurm_args",
        "--partition=gpu --gres=gpu:1 --time=04:00:00",
    ),
    ("--slurm-queue-timeout", ["--slurm-queue-timeout", "30"], "slurm_queue_timeout", 30.0),
    ("--slurm-walltime-warning", ["--slurm-walltime-warning", "0"], "slurm_walltime_warning", 0.0),
    ("--slurm-status-interval", ["--slurm-status-interval", "5"], "slurm_status_interval", 5.0),
    ("--sge-args", ["--sge-args", "-pe smp 4 -q gpu.q"], "sge_args", "-pe smp 4 -q gpu.q"),
    ("--sge-queue-timeout", ["--sge-queue-timeout", "30"], "sge_queue_timeout", 30.0),
    ("--sge-walltime-warning", ["--sge-walltime-warning", "0"], "sge_walltime_warning", 0.0),
    ("--sge-status-interval", ["--sge-status-interval", "5"], "sge_status_interval", 5.0),
    ("--local-transport", ["--local-transport", "tcp"], "local_transport", "tcp"),
    (
        "--forward",
        ["--forward", "18787", "--forward", "15432:db.internal:5432"],
        "forward",
        ["18787", "15432:db.internal:5432"],
    ),
    ("--auto-forward", ["--no-auto-forward"], "auto_forward", False),
    # clearing optional fields
    ("--pre-command", ["--pre-command", ""], "pre_command", None),
    ("--remote-cwd", ["--remote-cwd", ""], "remote_cwd", None),
    ("--display-name", ["--display-name", ""], "display_name", "python3 (sshpyk-test)"),
    ("--unset-remote-env", ["--unset-remote-env", "B"], "remote_env", {"A": "1"}),
]


@pytest.mark.parametrize(
    ("flag", "args", "field", "expected"),
    EDITS,
    ids=[" ".join(repr(a) for a in e[1]) for e in EDITS],
)
def test_edit_flag_changes_only_its_field(
    base, sshd, tmp_path, flag: str, args: list[str], field: str, expected: Any
) -> None:
    config = other_config(tmp_path, sshd)
    args = [a.replace("{other_config}", config) for a in args]
    if expected == "{other_config}":
        expected = config
    before = load_spec("ssh_edit").as_dict()
    result = sshpyk("edit", "ssh_edit", "--no-check", *args)
    assert result.exit_code == 0, result.output
    assert f"  {field}: " in result.stdout
    after = load_spec("ssh_edit").as_dict()
    assert after[field] == expected
    assert {k: v for k, v in after.items() if k != field} == {
        k: v for k, v in before.items() if k != field
    }


def test_every_add_flag_is_editable() -> None:
    """The list above covers every option of `add` (a peer tool forgot some)."""
    add_flags = {opt for p in add.params for opt in p.opts if opt.startswith("--")}
    covered = {e[0] for e in EDITS} | {
        "--kernel-name",
        "--replace",
        "--no-check",
        "--no-persistent",  # tested below: the flag's other half
        "--no-auto-forward",  # the other half of --auto-forward (listed with it above)
        # discovery (add --discover): how add finds kernels, not settings of one
        *("--discover", "--all", "--select", "--search", "--search-only", "--json"),
        "--timeout",
    }
    assert add_flags <= covered, add_flags - covered


def test_every_kernel_option_is_an_add_flag() -> None:
    """add (and so edit, above) has a flag for every field of the one config model."""
    add_dests = {p.name for p in add.params}
    assert {f.name for f in config_fields()} <= add_dests


def test_edit_keeps_keys_it_does_not_know(base) -> None:
    """Regression: `edit --display-name` dropped slurm_status_interval (an option the
    kernelspec model did not have) and any other key from kernel.json."""
    path = Path(base.resource_dir) / "kernel.json"
    data = json.loads(path.read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    config.update({"slurm_status_interval": 1.5, "from_a_newer_sshpyk": [1, {"x": "y"}]})
    path.write_text(json.dumps(data))
    result = sshpyk("edit", "ssh_edit", "--display-name", "X")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n  ") == 1 and "  display_name: " in result.stdout
    written = json.loads(path.read_text())
    assert written["display_name"] == "X"
    stored = written["metadata"]["kernel_provisioner"]["config"]
    assert stored == config
    assert load_spec("ssh_edit").slurm_status_interval == 1.5


def test_edit_no_persistent_turns_it_off(base) -> None:
    assert sshpyk("edit", "ssh_edit", "-n", "--persistent").exit_code == 0
    assert load_spec("ssh_edit").persistent is True
    result = sshpyk("edit", "ssh_edit", "-n", "--no-persistent")
    assert result.exit_code == 0, result.output
    assert load_spec("ssh_edit").persistent is False


def test_edit_rename_moves_the_kernel_dir(base) -> None:
    old_dir = Path(base.resource_dir)
    (old_dir / "logo-64x64.png").write_bytes(b"png")
    result = sshpyk("edit", "ssh_edit", "--kernel-name", "ssh_renamed", "-n")
    assert result.exit_code == 0, result.output
    new = load_spec("ssh_renamed")
    assert Path(new.resource_dir) == old_dir.parent / "ssh_renamed"
    assert (Path(new.resource_dir) / "logo-64x64.png").read_bytes() == b"png"
    assert not old_dir.exists()
    assert new.remote_env == {"A": "1", "B": "x"}


def test_edit_rename_refuses_to_overwrite(base, make_kernelspec) -> None:
    make_kernelspec("ssh_taken", display_name="Taken")
    result = sshpyk("edit", "ssh_edit", "--kernel-name", "ssh_taken", "-n")
    assert_one_line_error(result, "already exists", "--replace")
    assert load_spec("ssh_taken").display_name == "Taken"
    assert load_spec("ssh_edit")
    result = sshpyk("edit", "ssh_edit", "--kernel-name", "ssh_taken", "-n", "--replace")
    assert result.exit_code == 0, result.output
    assert load_spec("ssh_taken").pre_command == "true"


def test_edit_validates_against_the_remote(base, sshd) -> None:
    before = load_spec("ssh_edit")
    result = sshpyk("edit", "ssh_edit", "--remote-python", "/nonexistent/bin/python3")
    assert_one_line_error(result, "not found", "/nonexistent/bin/python3")
    assert load_spec("ssh_edit") == before  # nothing written
    result = sshpyk("edit", "ssh_edit", "--remote-kernel-name", "no_such_kernel")
    assert_one_line_error(result, "no kernelspec named 'no_such_kernel'")
    result = sshpyk("edit", "ssh_edit", "--ssh-host-alias", "sshpyk-refused")
    assert_one_line_error(result, "connection refused")
    assert load_spec("ssh_edit") == before
    # a change that does not concern the remote needs no connection
    assert sshpyk("edit", "ssh_edit", "--ssh-host-alias", "sshpyk-refused", "-n").exit_code == 0
    result = sshpyk(
        "edit", "ssh_edit", "--ssh-host-alias", sshd.alias, "--remote-python", sys.executable
    )
    assert result.exit_code == 0, result.output


def test_edit_errors(base, isolated_jupyter) -> None:
    assert_one_line_error(sshpyk("edit", "nope", "--language", "x"), "no kernel named 'nope'")
    local = isolated_jupyter / "kernels" / "loc"
    local.mkdir(parents=True)
    (local / "kernel.json").write_text(
        json.dumps({"argv": ["x"], "display_name": "L", "language": "python"})
    )
    assert_one_line_error(sshpyk("edit", "loc", "--language", "x"), "not an sshpyk kernel")
    result = sshpyk("edit", "ssh_edit")
    assert result.exit_code == 2 and "nothing to change" in result.stderr
    # the same value is no change either
    assert sshpyk("edit", "ssh_edit", "--transport", "auto").exit_code == 2
    assert_one_line_error(
        sshpyk("edit", "ssh_edit", "--remote-python", "", "-n"), "cannot be empty"
    )
    assert_one_line_error(
        sshpyk("edit", "ssh_edit", "--unset-remote-env", "NOPE", "-n"), "'NOPE' is not in"
    )
    assert_one_line_error(
        sshpyk("edit", "ssh_edit", "--start-timeout", "-1", "-n"), "start timeout"
    )
    assert_one_line_error(
        sshpyk("edit", "ssh_edit", "--ssh-config", "/nonexistent/config", "-n"), "does not exist"
    )
    result = sshpyk("edit", "ssh_edit", "--remote-env", "NOEQUALS", "-n")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr
    assert_one_line_error(
        sshpyk("edit", "ssh_edit", "--kernel-name", "bad name", "-n"), "invalid kernel name"
    )
    assert load_spec("ssh_edit").remote_env == {"A": "1", "B": "x"}
