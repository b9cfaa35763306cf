"""A second, unprivileged local user on the test host (which is also "the remote"):
the attacker of tests/e2e/security/test_shared_host.py.

``attacker`` (session scope) creates it with ``useradd --system`` and removes it with
``userdel`` at the end; it skips when the tests do not run as root or useradd is
missing. Its actions run in subprocesses that drop to its uid/gid (``user=``,
``group=``, ``extra_groups=[]``), with a system Python it can execute (the test's own
interpreter may live in a 0700 home).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable)


@dataclass
class SecondUser:
    name: str
    uid: int
    gid: int
    #: an interpreter this user may execute (the standard library is all it needs)
    python: str = ""
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def _drop(self) -> dict[str, Any]:
        return {
            "user": self.uid,
            "group": self.gid,
            "extra_groups": [],
            "cwd": "/",
            "env": {"PATH": "/usr/bin:/bin", "HOME": "/", "LC_ALL": "C.UTF-8"},
        }

    def run(
        self, argv: list[str], *, timeout: float = 30.0, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user; bounded by ``timeout``."""
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **self._drop(),
            **kw,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv[:3]} as {self.name} failed: {result.stderr[-2000:]}")
        return result

    def run_python(
        self, code: str, *args: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run([self.python, "-c", code, *args], timeout=timeout, check=check)

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` as this user (stopped at the end of the session at the latest)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, text=True, **self._drop(), **kw)
        self.procs.append(proc)
        return proc

    def popen_python(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return self.popen([self.python, "-c", code, *args], **kw)

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """Kill one of this user's processes (by its pid) and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def chown(self, path: Path | str) -> None:
        os.chown(path, self.uid, self.gid)

    def pids(self) -> list[int]:
        """Live processes of this user (they are all ours: the user is brand new)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(f"/proc/{entry}").st_uid == self.uid:
                        found.append(int(entry))
        return found


def _usable_python(user: SecondUser) -> str | None:
    for candidate in PYTHON_CANDIDATES:
        if not candidate or not os.path.exists(candidate):
            continue
        try:
            result = user.run([candidate, "-c", "print('ok')"], check=False, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if result.returncode == 0 and result.stdout.strip() == "ok":
            return candidate
    return None


@pytest.fixture(scope="session", name="attacker")
def attacker_fixture() -> Iterator[SecondUser]:
    """The second user (import ``attacker_fixture`` into a test module to use it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: a second local user is created with useradd")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel:
        pytest.skip("useradd/userdel are not installed (apt-get install passwd)")
    name = f"sshpyk-attacker-{secrets.token_hex(3)}"
    created = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    if created.returncode != 0:
        pytest.skip(f"useradd {name} failed: {created.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        user = SecondUser(name, entry.pw_uid, entry.pw_gid)
        python = _usable_python(user)
        if python is None:
            pytest.skip(f"no Python that {name} may execute ({', '.join(PYTHON_CANDIDATES)})")
        user.python = python
        yield user
        for proc in user.procs:
            user.stop(proc)
    finally:
        _remove(name, userdel)


def _remove(name: str, userdel: str) -> None:
    with contextlib.suppress(KeyError):
        uid = pwd.getpwnam(name).pw_uid
        user = SecondUser(name, uid, uid)
        deadline = time.monotonic() + 10
        while (pids := user.pids()) and time.monotonic() < deadline:
            for pid in pids:  # only processes of the throwaway user: all started by us
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
    subprocess.run(
        [userdel, name], capture_output=True, timeout=30, stdin=subprocess.DEVNULL, check=False
    )
