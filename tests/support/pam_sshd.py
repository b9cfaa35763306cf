"""Throwaway login users with passwords and one-time codes, for
tests/e2e/security/test_auth_prompts.py.

:func:`throwaway_user` creates a local user with a random password (``useradd`` +
``chpasswd``) and removes it at the end; it skips when not root. :class:`PamSSHD` runs
a :class:`~support.sshd.ThrowawaySSHD`'s config with ``UsePAM yes`` (given on sshd's command
line, which wins over the file's ``UsePAM no``). sshd's PAM service name is fixed
("sshd"), so :func:`oath_pam_service` replaces the global ``/etc/pam.d/sshd`` with a
pam_oath (TOTP) stack and restores the original in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .sshd import ThrowawaySSHD, find_sshd, stop_process

PAM_SSHD = Path("/etc/pam.d/sshd")
PAM_OATH_CANDIDATES = (
    "/lib/x86_64-linux-gnu/security/pam_oath.so",
    "/usr/lib/x86_64-linux-gnu/security/pam_oath.so",
    "/lib/aarch64-linux-gnu/security/pam_oath.so",
    "/usr/lib/aarch64-linux-gnu/security/pam_oath.so",
    "/lib/security/pam_oath.so",
)


@dataclass
class LoginUser:
    name: str
    password: str


@contextlib.contextmanager
def throwaway_user(prefix: str = "sshpykpw") -> Iterator[LoginUser]:
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("chpasswd"):
        pytest.skip("needs root with useradd and chpasswd (a throwaway login user)")
    name = f"{prefix}{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh", name],
        check=True,
        timeout=30,
    )
    try:
        subprocess.run(
            ["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, timeout=30
        )
        pwd.getpwnam(name)
        yield LoginUser(name, password)
    finally:
        subprocess.run(["userdel", "--force", name], check=False, timeout=30)


def pam_oath_module() -> str | None:
    for path in PAM_OATH_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


@contextlib.contextmanager
def oath_pam_service(users_file: Path) -> Iterator[None]:
    """/etc/pam.d/sshd asks for a TOTP code (pam_oath) and nothing else, meanwhile."""
    module = pam_oath_module()
    if module is None or not shutil.which("oathtool"):
        pytest.skip("needs libpam-oath and oathtool (apt-get install libpam-oath oathtool)")
    backup = PAM_SSHD.read_bytes() if PAM_SSHD.exists() else None
    try:
        PAM_SSHD.write_text(
            f"auth requisite {module} usersfile={users_file} window=4 digits=6\n"
            "account required pam_permit.so\n"
            "session required pam_permit.so\n"
            "password required pam_deny.so\n"
        )
        yield
    finally:
        if backup is None:
            PAM_SSHD.unlink(missing_ok=True)
        else:
            PAM_SSHD.write_bytes(backup)


class PamSSHD(ThrowawaySSHD):
    """A ThrowawaySSHD restarted with ``UsePAM yes`` and keyboard-interactive on."""

    def start(self, timeout: float = 10.0) -> PamSSHD:
        super().start(timeout)
        sshd = find_sshd()
        assert sshd is not None and self.proc is not None
        stop_process(self.proc)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sshd,
                    "-D",
                    "-e",
                    "-o",
                    "UsePAM=yes",
                    "-o",
                    "KbdInteractiveAuthentication=yes",
                    "-f",
                    str(self.root / "sshd_config"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        if not self._wait_listening(timeout):
            raise RuntimeError(f"PAM sshd did not start: {self.log_file.read_text()[-2000:]}")
        return self


def totp(secret_hex: str) -> str:
    return subprocess.run(
        ["oathtool", "--totp", secret_hex], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
