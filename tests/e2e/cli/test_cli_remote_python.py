"""`--remote-python` must not start with '-' (the remote shell's `exec` would take it
as an option): `sshpyk add` and `sshpyk edit` refuse it with one line, write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cli import add_args, assert_one_line_error, sshpyk

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("python", ["-c", "--version", " -i"])
def test_add_refuses_a_remote_python_that_starts_with_a_dash(
    sshd, isolated_jupyter: Path, python: str
) -> None:
    result = sshpyk(*add_args(sshd, "k_dash", "--no-check", remote_python=python))
    assert_one_line_error(result, f"remote python {python!r} starts with '-'")
    assert not (isolated_jupyter / "kernels" / "k_dash").exists()


def test_edit_refuses_a_remote_python_that_starts_with_a_dash(sshd, isolated_jupyter: Path) -> None:
    assert sshpyk(*add_args(sshd, "k_edit", "--no-check")).exit_code == 0
    spec_file = isolated_jupyter / "kernels" / "k_edit" / "kernel.json"
    before = spec_file.read_text()
    result = sshpyk("edit", "k_edit", "--remote-python", "-m", "--no-check")
    assert_one_line_error(result, "remote python '-m' starts with '-'")
    assert spec_file.read_text() == before
    # a path that merely contains a dash is fine
    result = sshpyk("edit", "k_edit", "--remote-python", "/opt/env-a/bin/python", "--no-check")
    assert result.exit_code == 0, result.output
    assert "/opt/env-a/bin/python" in json.dumps(json.loads(spec_file.read_text()))
