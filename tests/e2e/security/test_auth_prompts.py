"""Logins that need a person, against real OpenSSH: a throwaway user with a password
behind ``AuthenticationMethods publickey,password``, a TOTP code through PAM
(pam_oath) and keyboard-interactive, a key passphrase, a password-asking bastion;
answered by small SSH_ASKPASS scripts; wrong answers, BatchMode, and no terminal and
no askpass (a one-line error within seconds)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from sshpyk import SSHSession
from sshpyk.errors import BatchModeError, LoginPromptError
from sshpyk.ssh import pool

from support.broker import ClientProcess, env_for, temp_broker_dir
from support.cli import run_in_pty, sshpyk
from support.pam_sshd import LoginUser, PamSSHD, oath_pam_service, throwaway_user, totp
from support.sshd import ThrowawaySSHD, find_sshd

pytestmark = pytest.mark.timeout(120)


@dataclass
class PwHost:
    sshd: ThrowawaySSHD
    user: LoginUser
    config: Path
    root: Path


def _shared_dir() -> Path:
    """A directory the throwaway user can read (sshd reads its keys as that user)."""
    path = Path(tempfile.mkdtemp(prefix="sshpyk-auth-"))
    path.chmod(0o755)
    return path


def _host_block(name: str, port: int, user: str, key: Path, known: Path, extra: str) -> str:
    return f"""Host {name}
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {key}
  IdentitiesOnly yes
  UserKnownHostsFile {known}
{extra}
"""


@pytest.fixture(scope="module")
def pw(sshd: ThrowawaySSHD) -> Iterator[PwHost]:
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed")
    with throwaway_user() as user:
        root = _shared_dir()
        try:
            keys = root / "authorized_keys"
            shutil.copy(sshd.root / "authorized_keys", keys)
            keys.chmod(0o644)
            extra = f"""Match User {user.name}
  AuthorizedKeysFile {keys}
  PasswordAuthentication yes
  AuthenticationMethods publickey,password
"""
            with ThrowawaySSHD(root / "sshd", extra_sshd_config=extra) as d:
                key = d.root / "id_ed25519"
                shutil.copy(key, root / "id_user")  # the same key pair, for the user
                shutil.copy(key.with_suffix(".pub"), root / "id_user.pub")
                keys.write_text((d.root / "authorized_keys").read_text())
                # the main sshd's key, encrypted in OpenSSH's own format (what ssh-keygen
                # writes; asyncssh decrypts it with bcrypt): a passphrase prompt
                enc = root / "id_encrypted"
                plain = asyncssh.read_private_key(sshd.root / "id_ed25519")
                enc.write_bytes(plain.export_private_key("openssh", "pass-phrase-42"))
                shutil.copy(sshd.root / "id_ed25519.pub", root / "id_encrypted.pub")
                enc.chmod(0o600)
                block = (d.port, user.name, root / "id_user", d.known_hosts)
                config = root / "ssh_config"
                config.write_text(
                    _host_block("pw-host", *block, "  NumberOfPasswordPrompts 2")
                    + _host_block("pw-batch", *block, "  BatchMode yes")
                    + _host_block(
                        "pw-behind",
                        sshd.port,
                        sshd.user,
                        sshd.root / "id_ed25519",
                        sshd.known_hosts,
                        "  ProxyJump pw-host",
                    )
                    + _host_block("pw-passphrase", sshd.port, sshd.user, enc, sshd.known_hosts, "")
                )
                yield PwHost(d, user, config, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)


class Askpass:
    """A small SSH_ASKPASS script: logs each prompt it gets, answers from a file."""

    def __init__(self, where: Path, answer: str | None = None, command: str | None = None):
        self.log = where / "askpass.log"
        self.answer = where / "askpass.answer"
        self.path = where / "askpass.sh"
        if answer is not None:
            self.answer.write_text(answer + "\n")
        reply = command or f"cat {self.answer}"
        self.path.write_text(
            f'#!/bin/sh\nprintf "%s|%s\\n" "$1" "${{SSH_ASKPASS_PROMPT-}}" >> {self.log}\n{reply}\n'
        )
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)

    def prompts(self) -> list[str]:
        if not self.log.exists():
            return []
        return [line.split("|")[0] for line in self.log.read_text().splitlines()]

    def use(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("SSH_ASKPASS", str(self.path))
        monkeypatch.setenv("SSH_ASKPASS_REQUIRE", "force")


def _no_secret(secret: str, caplog: pytest.LogCaptureFixture) -> None:
    assert secret not in caplog.text
    assert all(secret not in value for value in os.environ.values())
    assert all(secret not in arg for arg in sys.argv)


async def test_password_after_key_one_prompt_shared(pw, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    first = await SSHSession.connect("pw-host", ssh_config=pw.config, connect_timeout=20)
    second = await SSHSession.connect("pw-host", ssh_config=pw.config, connect_timeout=20)
    try:
        conns = await asyncio.gather(first.connection(), second.connection())
        assert conns[0] is conns[1]
        assert conns[0].get_extra_info("username") == pw.user.name
    finally:
        await first.aclose()
        await second.aclose()
    assert ask.prompts() == ["'pw-host' password: "]  # one prompt for both users
    assert "|" in ask.log.read_text() and "|\n" in ask.log.read_text()  # no PROMPT var
    _no_secret(pw.user.password, caplog)
    assert "asking for a password on the askpass" in caplog.text


async def test_wrong_password_bounded(pw, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ask = Askpass(tmp_path, "not-" + pw.user.password)
    ask.use(monkeypatch)
    started = time.monotonic()
    with pytest.raises(LoginPromptError) as info:
        async with await SSHSession.connect("pw-host", ssh_config=pw.config, connect_timeout=30):
            pass
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("authentication failed for 'pw-host': password not accepted")
    assert "NumberOfPasswordPrompts 2" in text
    assert len(ask.prompts()) == 2  # NumberOfPasswordPrompts
    assert time.monotonic() - started < 30
    _no_secret("not-" + pw.user.password, caplog)


async def test_batch_mode_never_prompts(pw, tmp_path, monkeypatch) -> None:
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    with pytest.raises(BatchModeError, match="BatchMode yes forbids prompting"):
        async with await SSHSession.connect("pw-batch", ssh_config=pw.config, connect_timeout=20):
            pass
    assert ask.prompts() == []


NO_TTY_SCRIPT = """
import asyncio, sys, time
from sshpyk import SSHSession
async def main():
    started = time.monotonic()
    try:
        async with await SSHSession.connect(sys.argv[1], ssh_config=sys.argv[2]):
            print("connected")
    except Exception as exc:
        print(type(exc).__name__, exc)
    print(f"{time.monotonic() - started:.2f}")
asyncio.run(main())
"""


def test_no_terminal_no_askpass_fails_fast(pw) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_ASKPASS")}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    done = subprocess.run(
        [sys.executable, "-c", NO_TTY_SCRIPT, "pw-host", str(pw.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        start_new_session=True,  # no controlling terminal
        stdin=subprocess.DEVNULL,
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 2, (done.stdout, done.stderr)
    assert lines[0].startswith("LoginPromptError authentication failed for 'pw-host'"), lines
    assert "no terminal to ask on and no SSH_ASKPASS" in lines[0]
    assert "`sshpyk check pw-host`" in lines[0]
    assert float(lines[1]) < 5.0
    assert "Traceback" not in done.stderr


async def test_bastion_prompt_names_the_bastion(pw, sshd, tmp_path, monkeypatch) -> None:
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    async with await SSHSession.connect(
        "pw-behind", ssh_config=pw.config, connect_timeout=20
    ) as session:
        conn = await session.connection()
        assert conn.get_extra_info("username") == sshd.user
    assert ask.prompts() == ["bastion 'pw-host' (on the way to 'pw-behind') password: "]


async def test_key_passphrase(pw, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ask = Askpass(tmp_path, "pass-phrase-42")
    ask.use(monkeypatch)
    async with await SSHSession.connect(
        "pw-passphrase", ssh_config=pw.config, connect_timeout=20
    ) as session:
        await session.connection()
    prompts = ask.prompts()
    assert len(prompts) == 1 and prompts[0].startswith("Enter passphrase for key '"), prompts
    assert "id_encrypted" in prompts[0] and "'pw-passphrase'" in prompts[0]
    _no_secret("pass-phrase-42", caplog)


async def test_wrong_passphrase(pw, tmp_path, monkeypatch) -> None:
    ask = Askpass(tmp_path, "wrong-phrase")
    ask.use(monkeypatch)
    with pytest.raises(LoginPromptError, match="authentication failed for 'pw-passphrase'"):
        async with await SSHSession.connect(
            "pw-passphrase", ssh_config=pw.config, connect_timeout=20
        ):
            pass
    assert len(ask.prompts()) == 3  # NumberOfPasswordPrompts' default


async def test_reconnect_prompts_again(pw, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sshpyk")
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    shared = pool.acquire("pw-host", str(pw.config))
    try:
        conn = await shared.ensure_connected(20)
        conn.abort()
        await asyncio.wait_for(conn.wait_closed(), 10)
        again = await shared.ensure_connected(20)
        assert again is not conn
    finally:
        await pool.release(shared)
    assert len(ask.prompts()) == 2
    assert "SSH connection was lost: reconnecting" in caplog.text
    assert "(the connection is being reopened)" in caplog.text


def test_check_shows_offered_and_succeeded_methods(pw, tmp_path, monkeypatch) -> None:
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    result = sshpyk("check", "--json", "pw-host", "--ssh-config", str(pw.config), "--no-kernel")
    stages = {stage["stage"]: stage for stage in json.loads(result.stdout)["stages"]}
    auth = stages["auth"]
    assert auth["status"] == "ok", auth
    assert f"logged in as {pw.user.name}" in auth["detail"], auth
    assert "server offered publickey, password" in auth["detail"], auth
    assert "succeeded: publickey then password" in auth["detail"], auth
    assert pw.user.password not in result.output
    assert len(ask.prompts()) == 1


def test_check_auth_failure_names_methods(pw, tmp_path, monkeypatch) -> None:
    ask = Askpass(tmp_path, "nope")
    ask.use(monkeypatch)
    result = sshpyk("check", "pw-host", "--ssh-config", str(pw.config), "--no-kernel")
    assert result.exit_code == 1
    assert "authentication failed for 'pw-host'" in result.stderr, result.output
    assert "server offered publickey, password" in result.output
    assert "SSH_ASKPASS" in result.output


# -- keyboard-interactive: a real TOTP second factor through PAM (pam_oath) -----------


@pytest.fixture(scope="module")
def otp(sshd: ThrowawaySSHD) -> Iterator[tuple[PamSSHD, LoginUser, Path, str]]:
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed")
    with throwaway_user("sshpykotp") as user:
        root = _shared_dir()
        try:
            users = root / "users.oath"
            secret = secrets.token_hex(20)
            users.write_text(f"HOTP/T30 {user.name} - {secret}\n")
            users.chmod(0o600)
            keys = root / "authorized_keys"
            extra = f"""Match User {user.name}
  AuthorizedKeysFile {keys}
  AuthenticationMethods publickey,keyboard-interactive
"""
            with oath_pam_service(users), PamSSHD(root / "sshd", extra_sshd_config=extra) as d:
                keys.write_text((d.root / "authorized_keys").read_text())
                keys.chmod(0o644)
                shutil.copy(d.root / "id_ed25519", root / "id_user")
                config = root / "ssh_config"
                config.write_text(
                    _host_block("otp-host", d.port, user.name, root / "id_user", d.known_hosts, "")
                )
                yield d, user, config, secret
        finally:
            shutil.rmtree(root, ignore_errors=True)


async def test_totp_keyboard_interactive(otp, tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    _, user, config, secret = otp
    ask = Askpass(tmp_path, command=f"oathtool --totp {secret}")
    ask.use(monkeypatch)
    async with await SSHSession.connect(
        "otp-host", ssh_config=config, connect_timeout=20
    ) as session:
        conn = await session.connection()
        assert conn.get_extra_info("username") == user.name
    prompts = ask.prompts()
    assert len(prompts) == 1, prompts
    assert "('otp-host') One-time password (OATH)" in prompts[0], prompts
    _no_secret(totp(secret), caplog)
    assert secret not in caplog.text


async def test_totp_wrong_code(otp, tmp_path, monkeypatch) -> None:
    _, _, config, _ = otp
    ask = Askpass(tmp_path, "000000x")
    ask.use(monkeypatch)
    with pytest.raises(LoginPromptError, match="authentication failed for 'otp-host'"):
        async with await SSHSession.connect("otp-host", ssh_config=config, connect_timeout=30):
            pass
    assert 1 <= len(ask.prompts()) <= 3


# -- the controlling terminal ----------------------------------------------------------

TTY_SCRIPT = """
import asyncio, os, sys
os.close(os.open(os.ttyname(0), os.O_RDWR))  # session leader: the pty becomes our terminal
from sshpyk import SSHSession
from sshpyk.ssh.prompt import LoginPrompter
async def main():
    if sys.argv[1] == "echo":
        prompter = LoginPrompter("'echo-test'", "echo-test")
        shown = await prompter.ask("code", "Shown code: ", echo=True)
        hidden = await prompter.ask("code", "Hidden code: ", echo=False)
        print("answers", len(shown), len(hidden), shown == "visible1", hidden == "secret22")
        return
    try:
        async with await SSHSession.connect(sys.argv[1], ssh_config=sys.argv[2]) as session:
            conn = await session.connection()
            print("connected as", conn.get_extra_info("username"))
    except Exception as exc:
        print(type(exc).__name__, exc)
asyncio.run(main())
"""


def _on_terminal(args: list[str], answers: dict[str, str], timeout: float = 60.0) -> str:
    """Run TTY_SCRIPT with a pty as its controlling terminal; type ``answers[prompt]``
    when ``prompt`` shows up (each once); return everything the terminal showed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_ASKPASS")}
    return run_in_pty(
        [sys.executable, "-c", TTY_SCRIPT, *args],
        env,
        timeout,
        answers=answers,
        new_session=True,
    )


def test_terminal_honours_echo_flags() -> None:
    shown = _on_terminal(["echo"], {"Shown code: ": "visible1", "Hidden code: ": "secret22"})
    assert "answers 8 8 True True" in shown, shown
    assert "visible1" in shown.split("Hidden code: ")[0]  # echoed as typed
    assert "secret22" not in shown  # not echoed


def test_password_on_the_terminal(pw) -> None:
    shown = _on_terminal(["pw-host", str(pw.config)], {"'pw-host' password: ": pw.user.password})
    assert f"connected as {pw.user.name}" in shown, shown
    assert pw.user.password not in shown  # typed without echo


@pytest.mark.slow
def test_three_processes_one_password_prompt_through_the_broker(pw, tmp_path, monkeypatch) -> None:
    """Issue 22: three processes start at once on a host that asks for a password
    after the key; through the connection broker there is one login, so one askpass
    call, made by one of those processes; all three use the same connection."""
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    with temp_broker_dir() as bdir:
        args = (bdir, 5.0, "pw-host", pw.config, "echo $SSH_CONNECTION")
        clients = [ClientProcess(*args) for _ in range(3)]
        try:
            reports = [client.report(90) for client in clients]
        finally:
            for client in clients:
                client.close(20)
        broker_log = (bdir / "broker.log").read_text()
        assert pw.user.password not in broker_log  # answers live in memory only
        assert not any(
            pw.user.password in f.read_text(errors="replace") for f in bdir.iterdir() if f.is_file()
        )
    assert [r["status"] for r in reports] == [0, 0, 0], reports
    assert len({r["out"] for r in reports}) == 1, reports  # one TCP connection
    assert ask.prompts() == ["'pw-host' password: "]  # one prompt for all three


#: a process that runs ``command`` through a session, reports, then runs it again (the
#: session reconnects if it must) for each "again" on stdin
AGAIN = r"""
import asyncio, json, sys
from sshpyk.ssh.session import Session

async def main(alias, config, command):
    session = await Session.connect(alias, ssh_config=config, connect_timeout=60)
    loop = asyncio.get_running_loop()
    while True:
        result = await session.run(command)
        print(json.dumps({"status": result.exit_status, "out": result.stdout}), flush=True)
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "again":
            break
    await session.aclose()

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.mark.slow
def test_a_reconnect_asks_once_for_all_processes(pw, tmp_path, monkeypatch) -> None:
    """Issue 22: three processes share the broker's connection to a password host; the
    connection drops (its sshd session killed); each runs a command again: one new
    login, so one more askpass call for the three."""
    ask = Askpass(tmp_path, pw.user.password)
    ask.use(monkeypatch)
    with temp_broker_dir() as bdir:
        env = env_for(bdir, 5.0)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", AGAIN, "pw-host", str(pw.config), "echo $SSH_CONNECTION"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(3)
        ]
        try:
            first = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
            assert len({r["out"] for r in first}) == 1 and ask.prompts() == ["'pw-host' password: "]
            killed = subprocess.run(
                ["pkill", "-KILL", "-u", pw.user.name, "-f", "^sshd: "],
                capture_output=True,
                timeout=10,
            )
            assert killed.returncode == 0, killed
            time.sleep(1.0)  # the broker sees the drop and lets its clients go
            for p in procs:
                p.stdin.write("again\n")  # type: ignore[union-attr]
                p.stdin.flush()  # type: ignore[union-attr]
            second = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
            assert [r["status"] for r in second] == [0, 0, 0], second
            assert len({r["out"] for r in second}) == 1  # one new connection for all
            assert second[0]["out"] != first[0]["out"]
            assert ask.prompts() == ["'pw-host' password: "] * 2  # one more, not three
        finally:
            for p in procs:
                with contextlib.suppress(OSError):
                    p.stdin.close()  # type: ignore[union-attr]
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                p.stdout.close()  # type: ignore[union-attr]
