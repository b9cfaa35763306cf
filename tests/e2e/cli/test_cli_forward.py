"""`sshpyk add/edit --forward` with bad values, against the real sshd: one line on stderr
(``Error: ...``), exit code 1 as for the CLI's other option errors, no traceback, and
nothing written (issue 21). tests/unit/test_config.py covers parse_forward itself;
this is the command line's path.

The privileged case needs a user who is not root. The tests' interpreter lives under
/root (0700), so another unix user cannot run this sshpyk: ``sshpyk add`` runs in-process
(click's CliRunner) with ``os.geteuid`` patched to an unprivileged uid instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sshpyk.kernelspec import load_spec
from sshpyk.values import _unprivileged_start

from support.cli import add_args, assert_one_line_error, sshpyk

pytestmark = pytest.mark.timeout(60)

#: (--forward values, what the one line says)
BAD = [
    (["0"], "--forward '0': the port 0 is not a port number (1-65535)"),
    (["70000"], "--forward '70000': the port 70000 is not a port number (1-65535)"),
    (["tensorboard"], "--forward 'tensorboard': the port 'tensorboard' is not a port number"),
    (["-1"], "is not a port number"),
    (["8080:db:x"], "the remote port 'x' is not a port number"),
    (["0:db:5432"], "the local port 0 is not a port number (1-65535)"),
    (["8080:db:70000"], "the remote port 70000 is not a port number (1-65535)"),
    (["8080:5432"], "use PORT or LOCAL_PORT:REMOTE_HOST:REMOTE_PORT"),
    (["8080:a b:80"], "'a b' is not a host name or address"),
    (["9000", "9000:db:5432"], "local port 9000 is forwarded twice"),
]


def forward_args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--forward", value)]


def nothing_written(isolated_jupyter: Path, name: str) -> None:
    assert not (isolated_jupyter / "kernels" / name).exists()


@pytest.mark.parametrize(("values", "said"), BAD, ids=[" ".join(v) for v, _ in BAD])
def test_add_rejects_a_bad_forward_in_one_line(
    sshd: Any, isolated_jupyter: Path, values: list[str], said: str
) -> None:
    result = sshpyk(*add_args(sshd, "ssh_fwd", *forward_args(values)))
    assert_one_line_error(result, said, code=1)
    nothing_written(isolated_jupyter, "ssh_fwd")


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch) -> int:
    """sshpyk sees an unprivileged effective uid (the process stays root)."""
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    return _unprivileged_start()


@pytest.mark.parametrize("value", ["80", "443:localhost:8443", "{low}:db.internal:5432"])
def test_a_privileged_local_port_as_non_root_is_one_line(
    sshd: Any, isolated_jupyter: Path, not_root: int, value: str
) -> None:
    if not_root <= 1:
        pytest.skip("no port is privileged here (net.ipv4.ip_unprivileged_port_start is 0)")
    value = value.format(low=not_root - 1)
    local = int(value.split(":")[0])
    if local >= not_root:
        pytest.skip(f"port {local} is not privileged here (unprivileged from {not_root})")
    result = sshpyk(*add_args(sshd, "ssh_fwd", "--forward", value))
    line = assert_one_line_error(result, f"local port {local} is privileged", code=1)
    assert f"use a port >= {not_root}" in line, line
    nothing_written(isolated_jupyter, "ssh_fwd")


def test_unprivileged_ports_as_non_root_are_stored(
    sshd: Any, isolated_jupyter: Path, not_root: int
) -> None:
    values = [str(max(not_root, 1024) + 7000), "15432:db.internal:5432", "8080:[::1]:80"]
    result = sshpyk(*add_args(sshd, "ssh_fwd", *forward_args(values), "--no-auto-forward"))
    assert result.exit_code == 0, (result.output, result.exception)
    spec = load_spec("ssh_fwd")
    assert spec.forward == values
    assert spec.auto_forward is False


def test_root_may_forward_a_privileged_local_port(sshd: Any, isolated_jupyter: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    result = sshpyk(*add_args(sshd, "ssh_fwd", "--forward", "80"))
    assert result.exit_code == 0, (result.output, result.exception)
    assert load_spec("ssh_fwd").forward == ["80"]


def test_edit_rejects_a_bad_forward_and_keeps_the_spec(
    sshd: Any, make_kernelspec: Any, isolated_jupyter: Path
) -> None:
    make_kernelspec("ssh_fwd_edit", forward=["8787"])
    spec_file = isolated_jupyter / "kernels" / "ssh_fwd_edit" / "kernel.json"
    before = spec_file.read_bytes()
    for values, said in BAD[:3]:
        result = sshpyk("edit", "ssh_fwd_edit", *forward_args(values))
        assert_one_line_error(result, said, code=1)
    assert spec_file.read_bytes() == before
