"""A throwaway OpenSSH sshd on 127.0.0.1 for tests, the demo and benchmarks.

Everything lives in one temp dir: fresh host and client keys, authorized_keys,
sshd_config, a generated ssh_config with several aliases and a pinned
known_hosts. ``python tests/support/sshd.py`` runs one in the foreground.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


def find_sshd() -> str | None:
    for path in SSHD_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str = "sshpyk-test") -> str:
    """A fresh ed25519 key pair at ``path`` (no passphrase): the public key's line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds; reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class ThrowawaySSHD:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        extra_sshd_config: str = "",
        alias: str = "sshpyk-test",
    ) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="sshpyk-sshd-"))
        self.alias = alias
        self.extra_sshd_config = extra_sshd_config
        self.user = getpass.getuser()
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.ssh_config = self.root / "ssh_config"
        self.known_hosts = self.root / "known_hosts"
        self.log_file = self.root / "sshd.log"

    def start(self, timeout: float = 10.0) -> ThrowawaySSHD:
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("OpenSSH sshd not found (apt-get install openssh-server)")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        host_pub = keygen(root / "host_ed25519")
        client_pub = keygen(root / "id_ed25519")
        keygen(root / "id_stranger")  # a key the server does not know
        keygen(root / "other_host")  # to fake a changed host key
        (root / "authorized_keys").write_text(client_pub + "\n")
        os.chmod(root / "authorized_keys", 0o600)
        last_error = ""
        for _ in range(5):  # the port may be taken between free_port() and bind
            self.port = free_port()
            (root / "sshd_config").write_text(
                f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {root / "host_ed25519"}
PidFile {root / "sshd.pid"}
AuthorizedKeysFile {root / "authorized_keys"}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
MaxSessions 200
MaxStartups 100:30:200
LogLevel VERBOSE
{self.extra_sshd_config}
"""
            )
            with open(self.log_file, "wb") as log:
                self.proc = subprocess.Popen(
                    [sshd, "-D", "-e", "-f", str(root / "sshd_config")],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            if self._wait_listening(timeout):
                break
            last_error = self.log_file.read_text(errors="replace")
            self._kill()
        else:
            raise RuntimeError(f"sshd did not start: {last_error[-2000:]}")
        other_pub = (root / "other_host.pub").read_text().split()
        host_fields = host_pub.split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_fields[0]} {host_fields[1]}\n")
        (root / "known_hosts_changed").write_text(
            f"[127.0.0.1]:{self.port} {other_pub[0]} {other_pub[1]}\n"
        )
        self.ssh_config.write_text(self.config_text())
        return self

    def config_text(self) -> str:
        root = self.root
        common = f"""  HostName 127.0.0.1
  User {self.user}
  IdentitiesOnly yes
"""
        return f"""Host {self.alias}
{common}  Port {self.port}
  IdentityFile {root / "id_ed25519"}
  UserKnownHostsFile {self.known_hosts}

Host sshpyk-badauth
{common}  Port {self.port}
  IdentityFile {root / "id_stranger"}
  UserKnownHostsFile {self.known_hosts}

Host sshpyk-badhostkey
{common}  Port {self.port}
  IdentityFile {root / "id_ed25519"}
  UserKnownHostsFile {root / "known_hosts_changed"}

Host sshpyk-refused
{common}  Port {free_port()}
  IdentityFile {root / "id_ed25519"}
  UserKnownHostsFile {self.known_hosts}
"""

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.settimeout(1.0)
                    if s.recv(4).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.02)
        return False

    def _kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def stop(self) -> None:
        self._kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawaySSHD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with ThrowawaySSHD() as d:
        print(f"sshd on 127.0.0.1:{d.port}; ssh -F {d.ssh_config} {d.alias}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)


def write_config(tmp_path: Path, text: str) -> str:
    """An ssh config file with ``text`` in ``tmp_path``; its path."""
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)
