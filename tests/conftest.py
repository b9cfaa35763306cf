"""Fixtures: a real OpenSSH sshd on loopback, isolated Jupyter dirs, SSH kernelspecs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faultproxy import FaultProxy, proxied_ssh_config
from sshd import ThrowawaySSHD, find_sshd

import sshpyk
from sshpyk import SSHSession
from sshpyk.kernelspec import SSHKernelSpec, kernels_dir, write_spec


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


def remote_processes(pattern: str) -> list[str]:
    """Command lines of live processes containing ``pattern`` (the remote is this host)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines()[1:]:
        fields = line.split(None, 2)
        if len(fields) == 3 and pattern in fields[2] and not fields[1].startswith("Z"):
            if "ps -eo" not in fields[2]:
                lines.append(line)
    return lines


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (the remote is this host: read /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def leftovers(run_root: Path) -> tuple[list[str], list[str]]:
    """(processes mentioning run_root, files under run_root) — both should be empty."""
    files = [str(p) for p in run_root.rglob("*")]
    return remote_processes(str(run_root)), files


def one_line(exc: BaseException) -> str:
    """The error's message, which must be one line and not empty."""
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


async def connect_error(
    alias: str, config: Path, *, connect_timeout: float = 10.0, within: float = 5.0
) -> BaseException:
    """The one-line SSHPykError that connecting to ``alias`` raises within ``within`` s."""
    started = time.monotonic()
    with pytest.raises(sshpyk.SSHPykError) as info:
        async with await SSHSession.connect(
            alias, ssh_config=config, connect_timeout=connect_timeout
        ):
            pass
    assert time.monotonic() - started < within
    one_line(info.value)
    return info.value


@pytest.fixture
def no_leftovers(run_root: Path) -> Iterator[Callable[[], None]]:
    def check() -> None:
        assert wait_until(lambda: leftovers(run_root) == ([], []), 10), leftovers(run_root)

    yield check


os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")


# -- the userspace fault proxy in front of the sshd (tests/faultproxy.py) ----------------
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


def proxied_kernelspec(
    make_kernelspec: Callable[..., SSHKernelSpec], config: Path, name: str, **provisioner: object
) -> None:
    """A kernelspec through the proxy; ``provisioner`` keys (link_grace, outage_buffer,
    grace_period) go straight into kernel.json's metadata.kernel_provisioner.config."""
    make_kernelspec(name, ssh_host_alias="sshpyk-proxied", ssh_config=str(config))
    if provisioner:
        path = Path(kernels_dir()) / name / "kernel.json"
        data = json.loads(path.read_text())
        data["metadata"]["kernel_provisioner"]["config"].update(provisioner)
        path.write_text(json.dumps(data))
