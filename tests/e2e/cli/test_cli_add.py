"""`sshpyk add` against the real sshd."""

from __future__ import annotations

import json
import sys

from click.testing import CliRunner

from sshpyk.cli import main
from sshpyk.kernelspec import PROVISIONER_NAME, kernels_dir, load_spec

from support.cli import add_args


def test_add_writes_kernelspec_with_remote_defaults(sshd, isolated_jupyter) -> None:
    result = CliRunner().invoke(main, add_args(sshd, "ssh_cli", "--start-timeout", "30"))
    assert result.exit_code == 0, result.output
    spec_file = isolated_jupyter / "kernels" / "ssh_cli" / "kernel.json"
    assert str(spec_file.parent) == f"{kernels_dir()}/ssh_cli"
    data = json.loads(spec_file.read_text())
    assert data["metadata"]["kernel_provisioner"]["provisioner_name"] == PROVISIONER_NAME
    config = data["metadata"]["kernel_provisioner"]["config"]
    assert config["ssh_host_alias"] == sshd.alias
    assert config["remote_python"] == sys.executable
    assert config["start_timeout"] == 30
    assert data["language"] == "python"  # read from the remote kernelspec
    assert data["display_name"] == f"Python 3 (ipykernel) ({sshd.alias})"
    spec = load_spec("ssh_cli")
    assert spec.ssh_config == str(sshd.ssh_config)


def test_add_refuses_overwrite_without_replace(sshd) -> None:
    runner = CliRunner()
    assert runner.invoke(main, [*add_args(sshd), "--no-check"]).exit_code == 0
    result = runner.invoke(main, [*add_args(sshd), "--no-check", "--display-name", "New"])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--replace" in result.output
    assert load_spec("ssh_cli").display_name != "New"  # nothing lost
    result = runner.invoke(
        main, [*add_args(sshd), "--no-check", "--display-name", "New", "--replace"]
    )
    assert result.exit_code == 0
    assert load_spec("ssh_cli").display_name == "New"


def test_add_all_options_stored(sshd) -> None:
    args = [
        *add_args(sshd, "ssh_full"),
        "--no-check",
        "--display-name",
        "Full",
        "--language",
        "python",
        "--remote-kernel-name",
        "python3",
        "--transport",
        "tcp",
        "--interrupt-mode",
        "message",
        "--remote-env",
        "A=1",
        "--remote-env",
        "B=x=y",
        "--pre-command",
        "module load cuda",
        "--remote-cwd",
        "/tmp",
    ]
    assert CliRunner().invoke(main, args).exit_code == 0
    spec = load_spec("ssh_full")
    assert (spec.transport, spec.interrupt_mode) == ("tcp", "message")
    assert spec.remote_env == {"A": "1", "B": "x=y"}
    assert (spec.pre_command, spec.remote_cwd) == ("module load cuda", "/tmp")


def test_add_bad_alias_is_one_line_error(sshd, isolated_jupyter) -> None:
    args = add_args(sshd, "k", alias="sshpyk-refused", remote_python=None)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: connection refused")
    assert len(result.output.strip().splitlines()) == 1
    assert not (isolated_jupyter / "kernels" / "k").exists()


def test_add_rejects_bad_input(sshd) -> None:
    runner = CliRunner()
    result = runner.invoke(main, [*add_args(sshd, "bad name"), "--no-check"])
    assert result.exit_code == 1 and "invalid kernel name" in result.output
    result = runner.invoke(main, [*add_args(sshd), "--no-check", "--remote-env", "NOEQUALS"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    result = runner.invoke(main, [*add_args(sshd), "--no-check", "--start-timeout", "0"])
    assert result.exit_code == 1 and "start timeout" in result.output


def test_add_missing_remote_python_writes_nothing(sshd, isolated_jupyter) -> None:
    args = add_args(sshd, "k_nopy")
    args[args.index(sys.executable)] = "/nonexistent/bin/python3"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: remote python '/nonexistent/bin/python3' not found")
    assert len(result.stderr.splitlines()) == 1
    assert not (isolated_jupyter / "kernels" / "k_nopy").exists()


def test_add_unknown_remote_kernel_lists_the_available_ones(sshd, isolated_jupyter) -> None:
    result = CliRunner().invoke(main, [*add_args(sshd, "k"), "--remote-kernel-name", "nope"])
    assert result.exit_code == 1
    assert "no kernelspec named 'nope'" in result.stderr and "available: " in result.stderr
    assert not (isolated_jupyter / "kernels" / "k").exists()


def test_add_no_check_does_not_contact_the_host(sshd) -> None:
    args = add_args(sshd, "k_down", "--no-check", alias="sshpyk-refused", remote_python=None)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    spec = load_spec("k_down")
    # without the remote kernelspec: the documented defaults
    assert (spec.language, spec.interrupt_mode) == ("python", "signal")
    assert spec.display_name == "python3 (sshpyk-refused)"


def test_add_remote_run_root_and_interrupt_mode_default(sshd, tmp_path) -> None:
    result = CliRunner().invoke(
        main, [*add_args(sshd, "k_rr"), "--remote-run-root", str(tmp_path / "runs")]
    )
    assert result.exit_code == 0, result.output
    spec = load_spec("k_rr")
    assert spec.remote_run_root == str(tmp_path / "runs")
    assert spec.interrupt_mode == "signal"  # read from the remote kernelspec


def test_add_new_options_stored_and_defaults_not_written(sshd, isolated_jupyter) -> None:
    args = [*add_args(sshd, "ssh_opts"), "--no-check"]
    extra = ["--local-transport", "tcp", "--slurm-status-interval", "5"]
    assert CliRunner().invoke(main, [*args, *extra]).exit_code == 0
    spec = load_spec("ssh_opts")
    assert (spec.local_transport, spec.slurm_status_interval) == ("tcp", 5.0)
    result = CliRunner().invoke(main, [*add_args(sshd, "ssh_plain"), "--no-check"])
    assert result.exit_code == 0, result.output
    data = json.loads((isolated_jupyter / "kernels" / "ssh_plain" / "kernel.json").read_text())
    config = data["metadata"]["kernel_provisioner"]["config"]
    # kernel.json as before: options at their defaults that it never had are left out
    assert "local_transport" not in config and "slurm_status_interval" not in config
    result = CliRunner().invoke(main, [*args, "--replace", "--local-transport", "udp"])
    assert result.exit_code == 2 and "udp" in result.output
