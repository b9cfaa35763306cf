"""kernel.json's argv: `sshpyk add` writes one that runs the argv launcher
(:mod:`sshpyk.launch`) with an absolute interpreter, and it round-trips through the
config model. No sshd needed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from jupyter_client.kernelspec import KernelSpecManager

from sshpyk.cli import main
from sshpyk.config import LAUNCH_MODULE
from sshpyk.errors import SSHPykError
from sshpyk.kernelspec import SSHKernelSpec, edited_spec, load_spec, save_edited_spec
from sshpyk.launch import ConnectionFile, _parser, load_kernelspec


def _add(name: str) -> None:
    args = ["add", "--kernel-name", name, "--ssh-host-alias", "gpubox", "--no-check"]
    result = CliRunner().invoke(main, args, prog_name="sshpyk")
    assert result.exit_code == 0, result.output


def test_add_writes_an_argv_that_runs_the_launcher(isolated_jupyter: Path) -> None:
    _add("ssh_argv")
    spec_dir = isolated_jupyter / "kernels" / "ssh_argv"
    argv = KernelSpecManager().get_kernel_spec("ssh_argv").argv
    python = argv[0]
    assert os.path.isabs(python) and os.access(python, os.X_OK), argv
    assert os.path.samefile(python, sys.executable)
    assert argv[1:3] == ["-m", LAUNCH_MODULE]
    assert argv[-1] == "{connection_file}"
    args = _parser().parse_args(argv[3:])
    assert os.path.samefile(args.kernel_dir, spec_dir)
    assert args.kernel == "ssh_argv"
    assert load_kernelspec(args.kernel_dir, args.kernel) == load_spec("ssh_argv")


def test_the_argv_round_trips_through_the_config_model(isolated_jupyter: Path) -> None:
    _add("ssh_round")
    path = isolated_jupyter / "kernels" / "ssh_round" / "kernel.json"
    data = json.loads(path.read_text())
    spec = SSHKernelSpec.from_kernel_json("ssh_round", data, resource_dir=str(path.parent))
    assert spec.to_kernel_json() == data
    assert data["argv"] == spec.launcher_argv(str(path.parent))


def test_a_rename_points_the_argv_at_the_new_directory(isolated_jupyter: Path) -> None:
    _add("ssh_old")
    old = load_spec("ssh_old")
    save_edited_spec(old, edited_spec(old, {"name": "ssh_new"}))
    argv = KernelSpecManager().get_kernel_spec("ssh_new").argv
    args = _parser().parse_args(argv[3:])
    assert os.path.samefile(args.kernel_dir, isolated_jupyter / "kernels" / "ssh_new")
    assert args.kernel == "ssh_new"


def test_the_kernelspec_is_found_by_name_if_its_directory_moved(isolated_jupyter: Path) -> None:
    _add("ssh_moved")
    spec = load_kernelspec(str(isolated_jupyter / "gone"), "ssh_moved")
    assert spec.ssh_host_alias == "gpubox"
    with pytest.raises(SSHPykError, match="no kernel named"):
        load_kernelspec(str(isolated_jupyter / "gone"), "ssh_nope")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("not json", "cannot read"),
        ("[]", "not a JSON object"),
        ('{"transport": "udp"}', "unknown transport"),
        ('{"transport": "tcp", "ip": "127.0.0.1", "shell_port": 1}', "no valid iopub_port"),
    ],
)
def test_a_bad_connection_file_is_one_line(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "conn.json"
    path.write_text(content)
    with pytest.raises(SSHPykError, match=problem) as info:
        ConnectionFile.read(str(path))
    assert "\n" not in str(info.value)


def test_the_key_is_not_in_the_repr(tmp_path: Path) -> None:
    ports = {f"{c}_port": n for n, c in enumerate(("shell", "iopub", "stdin", "control", "hb"), 1)}
    path = tmp_path / "conn.json"
    path.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1", "key": "s3cr3t", **ports}))
    conn = ConnectionFile.read(str(path))
    assert conn.key == "s3cr3t" and "s3cr3t" not in repr(conn)
