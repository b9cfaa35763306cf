"""Fixtures of the end-to-end tests (those of every test are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.sshd import ThrowawaySSHD, find_sshd


@pytest.fixture(scope="module")
def own_sshd(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThrowawaySSHD]:
    """An sshd nobody else uses (one per test module): its TCP connections and logins
    can be counted."""
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed")
    name = request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    server = ThrowawaySSHD(tmp_path_factory.mktemp(f"sshd-{name}"), alias=f"own-{name}").start()
    yield server
    server.stop()
