"""sshpyk.ssh.pool and sshpyk.ssh.session without an sshd: reference counting, the
services slot and its close hooks (bounded), handles that refuse reuse."""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from pathlib import Path

import pytest

from sshpyk.errors import SessionClosedError, SSHPykError
from sshpyk.ssh import pool
from sshpyk.ssh.session import Session, SessionState

pytestmark = pytest.mark.timeout(30)

SSH_PACKAGE = Path(__file__).resolve().parents[3] / "sshpyk" / "ssh"


#: the base modules the ssh layer may use (docs/architecture.rst)
SSH_LAYER_MAY_IMPORT = ("errors", "localfs", "tasks")


def test_the_ssh_layer_imports_only_base_modules_from_sshpyk() -> None:
    for path in SSH_PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module in SSH_LAYER_MAY_IMPORT, (path.name, node.module)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("sshpyk"), (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sshpyk") for a in node.names), path.name


async def test_acquire_shares_and_the_last_release_closes() -> None:
    first = pool.acquire("box", "/cfg")
    second = pool.acquire("box", "/cfg")
    other = pool.acquire("box", None)  # another config is another connection
    assert first is second and first is not other and first.refs == 2
    closed: list[float] = []

    async def hook(seconds: float) -> None:
        closed.append(seconds)

    first.on_close(hook)
    await pool.release(first, 5)
    assert closed == [] and first.refs == 1
    await pool.release(second, 5)
    assert closed == [5] and first.refs == 0
    assert pool.acquire("box", "/cfg") is not first  # gone from the registry
    await pool.close_all(1)


async def test_close_hooks_are_bounded_and_failures_logged(caplog) -> None:
    shared = pool.acquire("slow", None)
    shared.services["mine"] = object()
    ran: list[str] = []

    async def hangs(seconds: float) -> None:
        ran.append("hangs")
        await asyncio.sleep(3600)

    async def fails(seconds: float) -> None:
        ran.append("fails")
        raise RuntimeError("boom")

    shared.on_close(hangs)
    shared.on_close(fails)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sshpyk"):
        await pool.release(shared, 0.3)
    assert time.monotonic() - started < 2
    assert sorted(ran) == ["fails", "hangs"]
    assert "close hooks unfinished after 0.3s" in caplog.text


async def test_a_failing_hook_is_logged(caplog) -> None:
    shared = pool.acquire("failing", None)

    async def fails(seconds: float) -> None:
        raise RuntimeError("boom")

    shared.on_close(fails)
    with caplog.at_level(logging.WARNING, logger="sshpyk"):
        await pool.release(shared, 1)
    assert "a close hook failed: RuntimeError('boom')" in caplog.text


async def test_a_released_session_refuses_use() -> None:
    session = Session(pool.acquire("box", None), connect_timeout=1)
    assert session.state is SessionState.OPEN and not session.connected
    session.close()
    await asyncio.wait_for(session.wait_closed(), 5)
    assert session.state is SessionState.CLOSED
    with pytest.raises(SessionClosedError, match="'box' is closed"):
        await session.connection()
    with pytest.raises(SessionClosedError):
        async with session:
            pass


async def test_connect_to_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SSHPykError, match="does not exist"):
        await Session.connect("box", ssh_config=tmp_path / "nope")


async def test_a_failed_connect_releases_its_reference(tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text("Host box\n  Port notaport\n")
    with pytest.raises(SSHPykError):
        await Session.connect("box", ssh_config=config)
    assert ("box", str(config)) not in pool._registry()
