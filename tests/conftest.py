"""Fixtures: a real OpenSSH sshd on loopback, isolated Jupyter dirs, SSH kernelspecs, the
fault proxy. Helpers the tests import live in tests/support/."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshpyk.kernelspec import SSHKernelSpec, write_spec
from sshpyk.localfs import BROKER_DIR_ENV
from sshpyk.ssh.brokered import PERSIST_ENV

from support.broker import temp_broker_dir
from support.faultproxy import FaultProxy, proxied_ssh_config
from support.sshd import ThrowawaySSHD, find_sshd
from support.waiting import leftovers, wait_until

# Fixtures that live beside their helpers in tests/support/ (pytest reads pytest_plugins
# only in this, the top conftest). pytest put tests/ on sys.path to import this file,
# which is what makes ``support`` importable here and in every test module.
pytest_plugins = ["support.second_user"]

# Connection sharing is the product's default (connection_persist 600 s); the suite runs
# each process's own connection, as with connection_persist 0, unless a test turns
# sharing on (tests/e2e/network/test_broker.py, test_sharing.py): set before any test,
# so that every process a test starts inherits it.
os.environ[PERSIST_ENV] = "0"


@pytest.fixture(scope="session", autouse=True)
def _broker_dir() -> Iterator[Path]:
    """No test reaches the user's real broker dir: the run's own, its broker stopped."""
    with temp_broker_dir() as path:
        os.environ[BROKER_DIR_ENV] = str(path)
        try:
            yield path
        finally:
            os.environ.pop(BROKER_DIR_ENV, None)


def _need_sshd() -> None:
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySSHD]:
    _need_sshd()
    server = ThrowawaySSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_nofwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawaySSHD]:
    """An sshd that refuses every kind of forwarding."""
    _need_sshd()
    server = ThrowawaySSHD(
        tmp_path_factory.mktemp("sshd-nofwd"),
        extra_sshd_config="AllowTcpForwarding no\nAllowStreamLocalForwarding no\n",
        alias="sshpyk-nofwd",
    ).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def isolated_jupyter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    data = tmp_path / "jupyter-data"
    data.mkdir()
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    return data


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """Where remote run dirs go for this test, so leftovers can be counted."""
    path = tmp_path / "remote-run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def make_kernelspec(sshd: ThrowawaySSHD, run_root: Path) -> Callable[..., SSHKernelSpec]:
    def make(name: str = "ssh_test", **overrides: object) -> SSHKernelSpec:
        fields: dict[str, object] = {
            "name": name,
            "ssh_host_alias": sshd.alias,
            "ssh_config": str(sshd.ssh_config),
            "remote_python": sys.executable,
            "remote_kernel_name": "python3",
            "display_name": f"Test ({name})",
            "language": "python",
            "start_timeout": 60.0,
            "remote_run_root": str(run_root),
        }
        fields.update(overrides)
        spec = SSHKernelSpec(**fields)  # type: ignore[arg-type]
        write_spec(spec, replace=True)
        return spec

    return make


@pytest.fixture
def no_leftovers(run_root: Path) -> Iterator[Callable[[], None]]:
    def check() -> None:
        assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)

    yield check


os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


# -- the userspace fault proxy in front of the sshd (support/faultproxy.py) -------------
@pytest.fixture
def proxy(sshd: ThrowawaySSHD) -> Iterator[FaultProxy]:
    with FaultProxy(sshd.port) as p:
        yield p


@pytest.fixture
def proxied_config(sshd: ThrowawaySSHD, proxy: FaultProxy, tmp_path: Path) -> Path:
    """An ssh config whose alias `sshpyk-proxied` goes through the fault proxy (keepalive
    15 s x 3: a 30 s blackhole does not end the connection by itself)."""
    return proxied_ssh_config(
        sshd,
        proxy,
        tmp_path,
        "sshpyk-proxied",
        "  ServerAliveInterval 15\n  ServerAliveCountMax 3\n",
    )
