"""The agent's trusted paths on shared hosts (sshpyk/agent/remote/paths.py), no SSH:
run root checks, the trusted-record reader, the checked removal of run dirs. Planting a
dir of another uid needs root (os.chown); those cases are skipped otherwise."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from sshpyk.agent.remote import paths
from sshpyk.agent.remote.protocol import AgentError

from support.agent import IS_ROOT, NOBODY, needs_root, private_dir, write_record

# -- run roots -------------------------------------------------------------------------


def test_run_root_own_0700_ok(root: Path) -> None:
    assert paths.run_root_problem(str(root)) == (os.path.realpath(root), None)


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o720])
def test_run_root_writable_by_others_refused(root: Path, mode: int) -> None:
    os.chmod(root, mode)
    _path, problem = paths.run_root_problem(str(root))
    assert problem and "group- or world-writable" in problem and "chmod 700" in problem
    assert "\n" not in problem
    with pytest.raises(AgentError) as err:
        paths.private_run_dir(str(root), "k")
    assert err.value.kind == "unsafe_path"
    assert list(root.iterdir()) == []


def test_run_root_root_owned_sticky_ok(tmp_path: Path) -> None:
    if IS_ROOT:
        sticky = tmp_path / "sticky"
        sticky.mkdir()
        os.chmod(sticky, 0o1777)
        assert paths.run_root_problem(str(sticky))[1] is None
        os.chmod(sticky, 0o777)  # the same without the sticky bit
        assert paths.run_root_problem(str(sticky))[1] is not None
    st = os.lstat("/tmp")
    if st.st_uid == 0 and st.st_mode & 0o1000:
        assert paths.run_root_problem("/tmp")[1] is None


def test_run_root_symlink_resolved_and_checked(root: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(root)
    assert paths.run_root_problem(str(link)) == (os.path.realpath(root), None)
    assert paths.checked_run_root(str(link)) == os.path.realpath(root)
    os.chmod(root, 0o777)
    _path, problem = paths.run_root_problem(str(link))
    assert problem and str(link) in problem


def test_run_root_in_a_writable_parent_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)
    (parent / "r").mkdir(mode=0o700)
    _path, problem = paths.run_root_problem(str(parent / "r"))
    assert problem and "another user can change" in problem


@needs_root
def test_run_root_of_another_uid_refused(root: Path) -> None:
    os.chown(root, NOBODY, NOBODY)
    _path, problem = paths.run_root_problem(str(root))
    assert problem and f"belongs to uid {NOBODY}" in problem


def test_missing_run_root_is_created_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert paths.checked_run_root(str(target), create=True) == os.path.realpath(target)
    for path in (tmp_path / "a", target):
        assert os.lstat(path).st_mode & 0o777 == 0o700
    run_dir = Path(paths.private_run_dir(str(target), "abcdefgh-1234"))
    assert run_dir.parent == target and run_dir.name.startswith("sshpyk-abcdefgh-")
    assert os.lstat(run_dir).st_mode & 0o777 == 0o700


# -- trusted records ---------------------------------------------------------------------


def test_read_trusted_accepts_a_private_record(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "sshpyk.json", {"pid": 5})
    assert paths.trusted_json(str(d), "sshpyk.json", os.getuid()) == ({"pid": 5}, os.getuid())


def test_read_trusted_refuses_symlinks_and_open_dirs(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "elsewhere.json", {"pid": 5})
    (d / "sshpyk.json").symlink_to(d / "elsewhere.json")
    assert paths.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    good = private_dir(root, "sshpyk-good")
    write_record(good, "sshpyk.json", {"pid": 5})
    (root / "sshpyk-link").symlink_to(good)
    assert paths.read_trusted(str(root / "sshpyk-link"), "sshpyk.json", os.getuid()) is None
    os.chmod(good, 0o750)
    assert paths.read_trusted(str(good), "sshpyk.json", os.getuid()) is None


def test_read_trusted_refuses_fifos_and_huge_files(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    os.mkfifo(d / "sshpyk.json")
    started = time.monotonic()
    assert paths.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    assert time.monotonic() - started < 1.0  # O_NONBLOCK: no writer, no hang
    (d / "agent.json").write_bytes(b" " * (paths.MAX_RECORD_BYTES + 1))
    assert paths.read_trusted(str(d), "agent.json", os.getuid()) is None


@needs_root
def test_read_trusted_refuses_a_file_of_another_uid(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    write_record(d, "sshpyk.json", {"pid": 5})
    os.chown(d / "sshpyk.json", NOBODY, NOBODY)
    assert paths.read_trusted(str(d), "sshpyk.json", os.getuid()) is None
    assert paths.read_trusted(str(d), "sshpyk.json", None) is None  # file owner != dir owner
    os.chown(d, NOBODY, NOBODY)
    assert paths.read_trusted(str(d), "sshpyk.json", None)[1] == NOBODY  # all_users
    assert paths.read_trusted(str(d), "sshpyk.json", os.getuid()) is None


def test_remove_tree_reports(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    (d / "sub").mkdir()
    (d / "sub" / "f").write_text("x")
    assert paths.remove_tree(str(d)) is None and not d.exists()
    assert paths.remove_tree(str(d)) is None  # already gone
    loose = private_dir(root, "sshpyk-y", 0o755)
    assert "not removing" in paths.remove_tree(str(loose)) and loose.exists()


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        creds = paths.peer_credentials(a)
    if creds is None:
        pytest.skip("no peer credentials on this platform")
    assert creds[1] == os.getuid() and creds[0] in (os.getpid(), None)


def test_write_json_atomic_replaces_the_record(root: Path) -> None:
    d = private_dir(root, "sshpyk-x")
    paths.write_json_atomic(str(d), "sshpyk.json", {"pid": 1})
    paths.write_json_atomic(str(d), "sshpyk.json", {"pid": 2})
    assert paths.trusted_json(str(d), "sshpyk.json", os.getuid()) == ({"pid": 2}, os.getuid())
    assert sorted(p.name for p in d.iterdir()) == ["sshpyk.json"]
