"""The agent's compiled code cached on the host (sshpyk/agent/remote/loader.py, issue 26):
the real command's loader in local Pythons, fed on stdin as sshd would, with the cache in
a temp dir (``XDG_CACHE_HOME``). A hit sends no code; a cache dir another user could
write, or a corrupt entry, is never used; each Python has its own entry."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sshpyk.agent.command import AGENT_HASH, remote_command
from sshpyk.agent.remote import loader
from sshpyk.agent.remote.protocol import PROTOCOL, Event, Op


def hello(run_root: Path) -> dict[str, Any]:
    return {"v": PROTOCOL, "op": Op.HELLO, "grace": 5, "run_root": str(run_root), "owner": "t"}


def start(
    cache: Path, run_root: Path, python: str = sys.executable, *, send_code: bool = True
) -> tuple[list[dict[str, Any]], bool]:
    """One agent start like RemoteAgent's: the header, the hello and a request written at
    once (the request stands for a pipelined launch), the code only if asked for; then
    stdin ends. (its events, whether the code was asked for)"""
    command = remote_command(python)
    lines = [hello(run_root), {"v": PROTOCOL, "op": Op.STATE, "rid": "r1"}]
    ahead = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    process = subprocess.Popen(
        ["sh", "-c", command.command],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(command.stdin + ahead)
    process.stdin.flush()
    first = json.loads(process.stdout.readline())
    asked = first.get("event") == Event.NEED_CODE
    events = [first]
    if asked and send_code:
        process.stdin.write(command.code)
    process.stdin.close()
    events += [json.loads(line) for line in process.stdout]
    process.stdout.close()
    assert process.stderr is not None
    process.stderr.close()
    process.wait(30)
    return events, asked


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "sshpyk" / "agent").iterdir())


def cached_entry(cache: Path, run_root: Path) -> Path:
    """The cache entry a first start writes."""
    start(cache, run_root)
    (entry,) = entries(cache)
    return entry


def served(events: list[dict[str, Any]]) -> bool:
    """The agent said hello and answered the request sent with the hello."""
    names = [e.get("event") for e in events]
    return Event.HELLO in names and any(e.get("rid") == "r1" for e in events)


def test_the_second_start_takes_the_code_from_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    events, asked = start(cache, tmp_path / "r")
    assert asked and served(events)
    assert "no such file" in events[0]["why"].lower()
    (entry,) = entries(cache)
    assert entry.name.startswith(AGENT_HASH + ".")
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    events, asked = start(cache, tmp_path / "r")
    assert not asked and served(events)  # no upload, no compile


def test_stdin_ending_before_the_code_is_a_quiet_exit(tmp_path: Path) -> None:
    events, asked = start(tmp_path / "cache", tmp_path / "r", send_code=False)
    assert asked and [e["event"] for e in events] == [Event.NEED_CODE]


@pytest.mark.parametrize("mode", [0o777, 0o750, 0o711])
def test_a_cache_dir_others_could_write_or_read_is_not_used(tmp_path: Path, mode: int) -> None:
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    before = entry.read_bytes()
    entry.parent.chmod(mode)
    for _ in range(2):  # neither read nor rewritten
        events, asked = start(cache, tmp_path / "r")
        assert asked and served(events)
        assert f"mode {mode:03o}" in events[0]["why"] and "not used" in events[0]["why"]
    assert entries(cache) == [entry] and entry.read_bytes() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_cache_dir_of_another_user_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    os.chown(entry.parent, 65534, 65534)  # nobody's, mode still 0700
    events, asked = start(cache, tmp_path / "r")
    assert asked and served(events) and "belongs to uid 65534" in events[0]["why"]


def test_a_symlinked_cache_dir_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    (cache / "sshpyk").mkdir(parents=True)
    (cache / "sshpyk" / "agent").symlink_to(real)
    events, asked = start(cache, tmp_path / "r")
    assert asked and served(events) and list(real.iterdir()) == []


def test_a_corrupt_entry_is_detected_and_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit of the code flipped
    entry.write_bytes(bytes(data))
    events, asked = start(cache, tmp_path / "r")
    assert asked and served(events) and "corrupt" in events[0]["why"]
    events, asked = start(cache, tmp_path / "r")  # rewritten by the start before
    assert not asked and served(events)
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated
    events, asked = start(cache, tmp_path / "r")
    assert asked and "corrupt" in events[0]["why"]


def test_an_entry_others_may_write_is_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    entry.chmod(0o666)
    events, asked = start(cache, tmp_path / "r")
    assert asked and "not a private file" in events[0]["why"]


def test_an_entry_of_another_bundle_is_not_used(tmp_path: Path) -> None:
    """Consistent in itself (its hash matches) but not of the bundle named: unused."""
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    other = loader.encode_bundle({"loader": "X = 1\n"})
    code = {"loader": compile("X = 1\n", "x", "exec")}
    fd = os.open(entry.parent, os.O_RDONLY)
    try:
        os.unlink(entry.name, dir_fd=fd)
        assert loader.write_entry(fd, AGENT_HASH, other, code)
    finally:
        os.close(fd)
    events, asked = start(cache, tmp_path / "r")
    assert asked and "another bundle" in events[0]["why"]


def other_python() -> str | None:
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for version in ("3.12", "3.10", "3.9", "3.8", "3.13"):
        if version == here:
            continue
        for found in Path("/root/.pyenv/versions").glob(f"{version}.*/bin/python3"):
            return str(found)
        for path in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
            if os.access(path, os.X_OK):
                return path
    return None


def test_another_python_gets_its_own_entry(tmp_path: Path) -> None:
    python = other_python()
    if python is None:
        pytest.skip("no second Python version on this machine")
    cache = tmp_path / "cache"
    start(cache, tmp_path / "r")
    events, asked = start(cache, tmp_path / "r", python)
    assert asked and served(events)  # not this Python's bytecode
    assert len(entries(cache)) == 2
    for python_here in (sys.executable, python):
        events, asked = start(cache, tmp_path / "r", python_here)
        assert not asked and served(events)


def test_old_entries_are_pruned(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = cached_entry(cache, tmp_path / "r")
    for i in range(loader.MAX_ENTRIES + 3):
        old = entry.with_name(f"{i:064x}.cpython-0-0")
        old.write_bytes(b"old")
        os.utime(old, (1000 + i, 1000 + i))
    stale = entry.with_name(".dead-writer.tmp")
    stale.write_bytes(b"half")
    os.utime(stale, (1000, 1000))
    entry.unlink()
    start(cache, tmp_path / "r")
    left = entries(cache)
    assert stale not in left
    assert len(left) == loader.MAX_ENTRIES and entry in left
    assert entry.with_name(f"{0:064x}.cpython-0-0") not in left  # the oldest went


def test_the_mode_is_set_on_the_dir_just_made_never_through_a_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dir made under a umask that takes owner bits gets 0700 (fchmod on the fd opened
    without following links); one swapped for a link right after the mkdir (a race) is
    not used, and what the link points to keeps its mode."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = loader.cache_dir()
    os.makedirs(os.path.dirname(path))
    old = os.umask(0o377)
    try:
        fd, why = loader.open_cache(create=True)
    finally:
        os.umask(old)
    assert fd is not None and why is None, why
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    os.rmdir(path)
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    real_mkdir = os.mkdir

    def racing_mkdir(name: Any, mode: int = 0o777, **kwargs: Any) -> None:
        real_mkdir(name, mode, **kwargs)
        if os.fspath(name) == path:  # another process swaps it for a link at once
            os.rmdir(name)
            os.symlink(other, name)

    monkeypatch.setattr(loader.os, "mkdir", racing_mkdir)
    fd, why = loader.open_cache(create=True)
    monkeypatch.undo()
    assert fd is None and why is not None
    assert stat.S_IMODE(other.stat().st_mode) == 0o755
