"""The agent's start over SSH (issue 26): its code comes from the host's cache once it is
there (no upload), and a kernel's first launch goes with the agent's hello; a start
that fails either way still says why in one line."""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path

import pytest

import sshpyk
from sshpyk import SSHSession

from support.errors import one_line
from support.waiting import leftovers, wait_until

pytestmark = pytest.mark.timeout(90)


def cache_pre_command(cache: Path) -> str:
    """A pre-command that gives the agent its own cache dir (XDG_CACHE_HOME)."""
    return f"export XDG_CACHE_HOME={cache}"


async def start_and_close(sshd, run_root: Path, pre_command: str) -> bool:
    """One kernel through a new connection; whether its agent had to be sent the code."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(
            python=sys.executable, run_root=str(run_root), pre_command=pre_command
        )
        try:
            assert kernel.process is not None
            uploaded = kernel.process.agent.code_uploaded
            assert kernel.timings["spawn"] < 0.5  # the launch went with the hello
        finally:
            await kernel.close()
    return uploaded


async def test_a_warm_host_gets_no_code(sshd, run_root, tmp_path, no_leftovers) -> None:
    cache = tmp_path / "cache"
    pre = cache_pre_command(cache)
    assert await start_and_close(sshd, run_root, pre)  # cold host: asked for the code
    (entry,) = (cache / "sshpyk" / "agent").iterdir()
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert not await start_and_close(sshd, run_root, pre)  # warm: from the cache
    (cache / "sshpyk" / "agent").chmod(0o777)  # another user could write it: unused
    assert await start_and_close(sshd, run_root, pre)
    no_leftovers()


async def start_error(sshd, run_root: Path, pre_command: str, **options) -> BaseException:
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        options.setdefault("python", sys.executable)
        with pytest.raises(sshpyk.SSHPykError) as info:
            await session.start_kernel(run_root=str(run_root), pre_command=pre_command, **options)
    one_line(info.value)
    assert list(run_root.iterdir()) == []
    return info.value


@pytest.mark.parametrize("cached", [False, True])
async def test_a_pipelined_launch_that_fails_says_why(sshd, run_root, tmp_path, cached) -> None:
    """The launch request went with the hello (and, on a cold host, ahead of the code)."""
    cache = tmp_path / "cache"
    pre = cache_pre_command(cache)
    if cached:
        await start_and_close(sshd, run_root, pre)
    exc = await start_error(sshd, run_root, pre, kernel_name="no_such_kernel")
    assert isinstance(exc, sshpyk.RemoteKernelSpecNotFoundError)
    assert "no_such_kernel" in str(exc)


async def test_an_agent_without_jupyter_client_says_why(sshd, run_root, tmp_path) -> None:
    wrapper = tmp_path / "bare-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    wrapper.chmod(0o755)
    pre = cache_pre_command(tmp_path / "cache")
    exc = await start_error(sshd, run_root, pre, python=str(wrapper))
    assert isinstance(exc, sshpyk.RemoteJupyterClientMissingError)


async def test_a_missing_python_with_a_pipelined_launch(sshd, run_root, tmp_path) -> None:
    pre = cache_pre_command(tmp_path / "cache")
    exc = await start_error(sshd, run_root, pre, python="/nonexistent/bin/python3")
    assert isinstance(exc, sshpyk.RemotePythonNotFoundError)


async def test_a_start_cancelled_after_its_pipelined_launch_leaves_no_kernel(
    sshd, run_root, tmp_path
) -> None:
    """The launch went with the hello; the start is cancelled before the hello comes back
    (here: the pre-command sleeps). The agent still reads the launch, and the stop that
    follows it: no kernel is left for the link grace (an hour by default)."""
    pre = cache_pre_command(tmp_path / "cache")
    await start_and_close(sshd, run_root, pre)  # a warm cache: no wait for the code
    pre += "; sleep 1.5"
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        start = session.start_kernel(python=sys.executable, run_root=str(run_root), pre_command=pre)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(start, 0.8)  # the exec and its stdin are sent by then
        await asyncio.sleep(2.5)  # the agent is up and has read the launch
        # (the session stays open: only the stop can end the kernel this soon)
        assert await asyncio.to_thread(wait_until, lambda: leftovers(run_root) == ([], []), 15), (
            leftovers(run_root)
        )
