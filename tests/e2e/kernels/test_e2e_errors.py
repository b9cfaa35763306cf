"""Every start failure gives one clear line, within seconds, as the right error class."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from jupyter_client.manager import AsyncKernelManager

import sshpyk
from sshpyk import SSHSession

from support.errors import connect_error, one_line

pytestmark = pytest.mark.timeout(60)


async def test_unknown_alias(sshd) -> None:
    exc = await connect_error("no-such-alias-sshpyk", sshd.ssh_config)
    assert isinstance(exc, sshpyk.HostNotFoundError)
    assert "no-such-alias-sshpyk" in str(exc)


async def test_connection_refused(sshd) -> None:
    exc = await connect_error("sshpyk-refused", sshd.ssh_config)
    assert isinstance(exc, sshpyk.HostRefusedError)


async def test_authentication_failure(sshd) -> None:
    exc = await connect_error("sshpyk-badauth", sshd.ssh_config)
    assert isinstance(exc, sshpyk.AuthenticationError)
    assert "IdentityFile" in str(exc)


async def test_changed_host_key(sshd) -> None:
    exc = await connect_error("sshpyk-badhostkey", sshd.ssh_config)
    assert isinstance(exc, sshpyk.HostKeyError)
    assert "known_hosts" in str(exc)


async def test_missing_ssh_config_file(tmp_path) -> None:
    with pytest.raises(sshpyk.SSHPykError, match="does not exist"):
        await SSHSession.connect("x", ssh_config=tmp_path / "nope")


async def start_error(sshd, run_root, **options) -> BaseException:
    started = time.monotonic()
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        options.setdefault("python", sys.executable)
        with pytest.raises(sshpyk.SSHPykError) as info:
            await session.start_kernel(run_root=str(run_root), **options)
    assert time.monotonic() - started < 15
    one_line(info.value)
    assert list(run_root.iterdir()) == []
    return info.value


@pytest.mark.parametrize("python", ["/nonexistent/bin/python3", "no-such-python3"])
async def test_remote_python_missing(sshd, run_root, python) -> None:
    exc = await start_error(sshd, run_root, python=python)
    assert isinstance(exc, sshpyk.RemotePythonNotFoundError)
    assert python in str(exc)


async def test_remote_env_prefix_is_accepted(sshd, run_root, no_leftovers) -> None:
    """--remote-python may be an environment prefix: PREFIX/bin/python is used."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(python=sys.prefix, run_root=str(run_root))
        await kernel.close()
    no_leftovers()


async def test_remote_jupyter_client_missing(sshd, run_root, tmp_path) -> None:
    wrapper = tmp_path / "bare-python"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # -S: no site-packages
    wrapper.chmod(0o755)
    exc = await start_error(sshd, run_root, python=str(wrapper))
    assert isinstance(exc, sshpyk.RemoteJupyterClientMissingError)


async def test_unknown_remote_kernel_name(sshd, run_root) -> None:
    exc = await start_error(sshd, run_root, kernel_name="no_such_kernel")
    assert isinstance(exc, sshpyk.RemoteKernelSpecNotFoundError)
    assert "no_such_kernel" in str(exc) and "python3" in str(exc)  # lists what exists


def remote_kernelspec(tmp_path: Path, name: str, code: str) -> str:
    """A kernelspec on the "remote", found through JUPYTER_PATH set by a pre-command."""
    spec_dir = tmp_path / "remote-jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-c", code, "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": name, "language": "python"})
    )
    return f"export JUPYTER_PATH={tmp_path / 'remote-jupyter'}"


async def test_kernel_exits_during_start(sshd, run_root, tmp_path) -> None:
    pre = remote_kernelspec(
        tmp_path, "crashy", "import sys; sys.stderr.write('boom-from-kernel\\n'); sys.exit(3)"
    )
    exc = await start_error(sshd, run_root, kernel_name="crashy", pre_command=pre)
    assert isinstance(exc, sshpyk.KernelStartError)
    assert "boom-from-kernel" in str(exc) and "code 3" in str(exc)


async def test_start_timeout(sshd, run_root, tmp_path, no_leftovers) -> None:
    pre = remote_kernelspec(tmp_path, "sleepy", "import time; time.sleep(60)")
    exc = await start_error(
        sshd, run_root, kernel_name="sleepy", pre_command=pre, start_timeout=2, transport="tcp"
    )
    assert isinstance(exc, sshpyk.KernelStartTimeoutError)
    no_leftovers()


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
async def test_forwarding_refused(sshd_nofwd, run_root, transport, no_leftovers) -> None:
    exc = await start_error(sshd_nofwd, run_root, transport=transport)
    assert isinstance(exc, sshpyk.ForwardingRefusedError)
    assert "Allow" in str(exc)
    no_leftovers()


async def test_errors_surface_as_kernel_start_error(make_kernelspec, run_root) -> None:
    make_kernelspec("ssh_badname", remote_kernel_name="no_such_kernel")
    km = AsyncKernelManager(kernel_name="ssh_badname")
    with pytest.raises(sshpyk.RemoteKernelSpecNotFoundError):
        await km.start_kernel()
    await km.cleanup_resources()
    assert list(run_root.iterdir()) == []


async def test_session_used_after_close(sshd) -> None:
    session = await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config)
    await session.aclose()
    with pytest.raises(sshpyk.SessionClosedError):
        await session.run("true")


async def test_login_noise_is_skipped(sshd, run_root, no_leftovers) -> None:
    """A chatty login script (here a pre-command) does not break the agent protocol."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        kernel = await session.start_kernel(
            python=sys.executable,
            run_root=str(run_root),
            pre_command='echo "Welcome to the cluster"; echo "{not json"',
        )
        await kernel.close()
    no_leftovers()


async def test_too_much_login_noise_is_one_clear_error(sshd, run_root) -> None:
    exc = await start_error(sshd, run_root, pre_command="seq 1 500")
    assert isinstance(exc, sshpyk.ProtocolError)
    assert "login scripts" in str(exc)


async def test_aes_gcm_preferred_unless_the_config_chooses(sshd, tmp_path) -> None:
    """AES-GCM (OpenSSL, AES-NI) first by default; a `Ciphers` line in the config wins."""
    async with await SSHSession.connect(sshd.alias, ssh_config=sshd.ssh_config) as session:
        conn = await session.connection()
        assert conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    config = tmp_path / "ssh_config_chacha"
    config.write_text(
        sshd.ssh_config.read_text().replace(
            f"Host {sshd.alias}\n", f"Host {sshd.alias}\n  Ciphers chacha20-poly1305@openssh.com\n"
        )
    )
    async with await SSHSession.connect(sshd.alias, ssh_config=config) as session:
        conn = await session.connection()
        assert conn.get_extra_info("send_cipher") == "chacha20-poly1305@openssh.com"


async def test_hanging_pre_command_is_a_timeout_not_a_hang(sshd, run_root, monkeypatch) -> None:
    """A login shell or pre-command that never hands over to the agent (a stale lock in
    ~/.bashrc, a `module load` waiting on a license server) is reported as such."""
    import sshpyk.agent.client

    monkeypatch.setattr(sshpyk.agent.client, "AGENT_START_TIMEOUT", 2.0)
    exc = await start_error(sshd, run_root, pre_command="sleep 30")
    assert isinstance(exc, sshpyk.RequestTimeoutError)
    assert "did not start within 2s" in str(exc) and "pre-command" in str(exc)
