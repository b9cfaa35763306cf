"""Unit tests (no SSH): private local files and dirs, kernel ids, the pre-command's
transport, and the unix-socket listeners of a ForwardSet."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from sshpyk.agent.command import python_command
from sshpyk.errors import SSHPykError, UnsafePathError
from sshpyk.kernels.forwards import ForwardSet
from sshpyk.localfs import (
    check_kernel_id,
    check_private_dir,
    make_private_dir,
    write_private_json,
)

pytestmark = pytest.mark.timeout(30)

#: a session stand-in: listeners need no SSH until a client connects, which these never do
NO_SSH = SimpleNamespace(alias="unit-test")


@pytest.mark.parametrize("kid", ["1c5f7e1a-9b2d-4c3e-8f00-123456789abc", "abc", "A-1", "x" * 128])
def test_kernel_id_accepted(kid: str) -> None:
    assert check_kernel_id(kid) == kid


@pytest.mark.parametrize(
    "kid",
    ["abc/../../../tmp/x", "../x", ".hidden", "", "-rf", "a b", "a\nb", "x" * 129, "é", 12],
)
def test_kernel_id_refused(kid: object) -> None:
    with pytest.raises(UnsafePathError) as info:
        check_kernel_id(kid)
    assert "\n" not in str(info.value)


def test_private_dir_checks(tmp_path: Path) -> None:
    mine = make_private_dir(tmp_path / "mine")
    assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o700
    assert make_private_dir(mine) == mine  # existing and ours: reused
    fresh = make_private_dir(parent=str(tmp_path))
    assert fresh.parent == tmp_path and stat.S_IMODE(os.lstat(fresh).st_mode) == 0o700

    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(UnsafePathError, match="chmod 700"):
        check_private_dir(open_dir)

    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(UnsafePathError, match="symlink"):
        check_private_dir(link)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_private_dir_of_another_user_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafePathError, match="uid 65534"):
        make_private_dir(theirs)


def test_private_json_never_follows_or_keeps(tmp_path: Path) -> None:
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    link = tmp_path / "conn.json"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match="already exists"):
        write_private_json(link, {"key": "k"})
    assert target.read_text() == "precious"

    # replace: the symlink itself is replaced by a new 0600 file, the target untouched
    write_private_json(link, {"key": "k"}, replace=True)
    assert not link.is_symlink() and target.read_text() == "precious"
    assert stat.S_IMODE(os.lstat(link).st_mode) == 0o600

    loose = tmp_path / "loose.json"
    loose.write_text("{}")
    loose.chmod(0o644)
    write_private_json(loose, {"key": "k"}, replace=True)
    assert stat.S_IMODE(os.lstat(loose).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    nested = tmp_path / "new-parent" / "c.json"
    write_private_json(nested, {"key": "k"})
    assert stat.S_IMODE(os.lstat(nested.parent).st_mode) == 0o700


def test_pre_command_not_in_argv_and_still_runs() -> None:
    secret = "s3cr3t-" + os.urandom(4).hex()
    pre = f"export TOKEN={secret}\ncd /\n"
    command = python_command(
        "python3", pre, "import os,sys;print(os.environ['TOKEN'], os.getcwd(), sys.stdin.read())"
    )
    assert secret not in command.command and secret.encode() in command.stdin
    result = subprocess.run(
        ["sh", "-c", command.command],
        input=command.stdin + b"rest of stdin",
        capture_output=True,
        timeout=20,
    )
    assert result.stdout.decode().split() == [secret, "/", "rest", "of", "stdin"], result


@pytest.mark.parametrize("python", ["-c", "--version", ""])
def test_remote_python_option_like_refused(python: str) -> None:
    with pytest.raises(SSHPykError, match="must not be empty or start with '-'"):
        python_command(python, None, "pass")


async def test_ipc_forwards_private_and_rebound(tmp_path: Path) -> None:
    forwards = ForwardSet(NO_SSH, transport="ipc")  # type: ignore[arg-type]
    try:
        ports = await forwards.open()
        assert ports == {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}
        assert forwards.directory is not None
        check_private_dir(forwards.directory)
        for channel in ports:
            assert stat.S_ISSOCK(os.lstat(forwards.path(channel)).st_mode)

        # jupyter_client removes ipc files on restart: rebind brings them back
        os.unlink(forwards.path("shell"))
        await forwards.rebind()
        probe = socket.socket(socket.AF_UNIX)
        probe.settimeout(2)
        try:
            probe.connect(forwards.path("shell"))
        finally:
            probe.close()

        # a second set asked for the same (live) dir gets a fresh one
        other = ForwardSet(NO_SSH, transport="ipc")  # type: ignore[arg-type]
        await other.open(ip=forwards.ip)
        try:
            assert other.ip != forwards.ip
        finally:
            await other.aclose()
    finally:
        directory = forwards.directory
        await forwards.aclose()
    assert directory is not None and not directory.exists()


async def test_ipc_forwards_reuse_a_stale_dir(tmp_path: Path) -> None:
    # what a process that died leaves: a private dir with socket files nobody listens on
    stale = make_private_dir(tmp_path / "stale")
    for n in range(1, 6):
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(str(stale / f"k-{n}"))
    forwards = ForwardSet(NO_SSH, transport="ipc")  # type: ignore[arg-type]
    try:
        await forwards.open(ip=str(stale / "k"))
        assert forwards.ip == str(stale / "k")  # the notebook's connection file stays valid
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(2)
            probe.connect(forwards.path("hb"))
    finally:
        await forwards.aclose()


def test_unknown_local_transport_refused() -> None:
    with pytest.raises(SSHPykError, match="ipc, tcp"):
        ForwardSet(NO_SSH, transport="udp")  # type: ignore[arg-type]
