"""A throwaway MIT Kerberos realm on loopback, and an sshd that logs users in with it,
for tests/e2e/security/test_kerberos.py.

:class:`ThrowawayKDC` makes a realm in a temp dir (its own krb5.conf and kdc.conf,
given to every Kerberos program through ``KRB5_CONFIG``/``KRB5_KDC_PROFILE``;
``/etc/krb5.conf`` is left alone), with random keys only (no password anywhere: users
get tickets from their keytab, ``kinit -k``), a host keytab for ``host/127.0.0.1``
and ``krb5kdc`` on a free 127.0.0.1 port. :class:`KerberosSSHD` is a
:class:`~support.sshd.ThrowawaySSHD` restarted with ``GSSAPIAuthentication yes``,
that keytab (``KRB5_KTNAME`` in its environment) and, unless asked otherwise, no
public key login. Both stop their processes (and sshd's sessions) in ``stop``.

Skips (a clear reason) only where the programs are missing: CI installs them through
scripts/setup (krb5-kdc, krb5-admin-server, krb5-user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .sshd import ThrowawaySSHD, find_sshd, stop_process

REALM = "SSHPYK.TEST"
KDC_PROGRAMS = ("krb5kdc", "kdb5_util", "kadmin.local", "kinit", "klist", "kdestroy")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for folder in _SBIN:
        path = os.path.join(folder, program)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_programs() -> list[str]:
    return [p for p in KDC_PROGRAMS if _which(p) is None]


def gssapi_installed() -> bool:
    try:
        import gssapi  # noqa: F401
    except ImportError:
        return False
    return True


def need_kerberos() -> None:
    """Skip with the reason when the KDC, the clients or python-gssapi are missing."""
    missing = missing_programs()
    if missing:
        pytest.skip(
            f"MIT Kerberos programs missing ({', '.join(missing)}): apt-get install "
            "krb5-kdc krb5-admin-server krb5-user (scripts/setup does)"
        )
    if not gssapi_installed():
        pytest.skip('python-gssapi missing: pip install "sshpyk[kerberos]" (scripts/setup does)')
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")


def _free_port_tcp_udp() -> int:
    """A 127.0.0.1 port free for both TCP and UDP (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no 127.0.0.1 port free for both TCP and UDP")


class ThrowawayKDC:
    """A realm with principals made on demand; start with :meth:`start`."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        realm: str = REALM,
        *,
        host_services: tuple[str, ...] = ("host/127.0.0.1",),
    ) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="sshpyk-kdc-"))
        self.realm = realm
        #: service principals put into :attr:`host_keytab` (sshd's) at the start
        self.host_services = host_services
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.krb5_conf = self.root / "krb5.conf"
        self.kdc_conf = self.root / "kdc.conf"
        self.host_keytab = self.root / "host.keytab"
        self.rcache = self.root / "rcache"
        self.log_file = self.root / "krb5kdc.log"

    @property
    def env(self) -> dict[str, str]:
        """What every Kerberos program of this realm needs in its environment."""
        return {
            "KRB5_CONFIG": str(self.krb5_conf),
            "KRB5_KDC_PROFILE": str(self.kdc_conf),
            "KRB5RCACHEDIR": str(self.rcache),
        }

    def _run(self, argv: list[str], stdin: str | None = None) -> str:
        program = _which(argv[0])
        assert program is not None, argv[0]
        done = subprocess.run(
            [program, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def start(self, timeout: float = 15.0) -> ThrowawayKDC:
        root = self.root
        root.mkdir(parents=True, exist_ok=True)
        self.rcache.mkdir(mode=0o700, exist_ok=True)
        self.port = _free_port_tcp_udp()
        # rdns/dns_canonicalize off: HostName 127.0.0.1 asks for host/127.0.0.1 (MIT's
        # defaults would reverse-resolve it to host/localhost)
        self.krb5_conf.write_text(
            f"""[libdefaults]
  default_realm = {self.realm}
  dns_lookup_kdc = false
  dns_lookup_realm = false
  dns_canonicalize_hostname = false
  rdns = false
  ignore_acceptor_hostname = true
  udp_preference_limit = 1
  forwardable = true
  kdc_timeout = 3000
  max_retries = 1

[realms]
  {self.realm} = {{
    kdc = 127.0.0.1:{self.port}
  }}

[domain_realm]
  127.0.0.1 = {self.realm}
  localhost = {self.realm}
"""
        )
        self.kdc_conf.write_text(
            f"""[kdcdefaults]
  kdc_listen = 127.0.0.1:{self.port}
  kdc_tcp_listen = 127.0.0.1:{self.port}

[realms]
  {self.realm} = {{
    database_name = {root / "principal"}
    key_stash_file = {root / "stash"}
    acl_file = {root / "kadm5.acl"}
    max_life = 1h
    max_renewable_life = 0
  }}

[logging]
  kdc = FILE:{self.log_file}
"""
        )
        (root / "kadm5.acl").write_text("")
        # the master password goes on stdin (twice: kdb5_util asks for a confirmation)
        master = secrets.token_urlsafe(24)
        self._run(["kdb5_util", "-r", self.realm, "create", "-s"], stdin=f"{master}\n{master}\n")
        for service in self.host_services:
            self.add_service(service, self.host_keytab)
        krb5kdc = _which("krb5kdc")
        assert krb5kdc is not None
        with open(root / "krb5kdc.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [krb5kdc, "-n", "-r", self.realm, "-P", str(root / "krb5kdc.pid")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        errors = (root / "krb5kdc.stderr").read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"krb5kdc did not start: {errors[-2000:]}")

    def kadmin(self, query: str) -> str:
        return self._run(["kadmin.local", "-r", self.realm, "-q", query])

    def add_user(self, name: str) -> Path:
        """A user principal with a random key; its keytab (what ``kinit -k`` reads)."""
        keytab = self.root / f"user-{name}.keytab"
        self.kadmin(f"addprinc -randkey {name}@{self.realm}")
        self.kadmin(f"ktadd -k {keytab} {name}@{self.realm}")
        return keytab

    def add_service(self, principal: str, keytab: Path) -> None:
        self.kadmin(f"addprinc -randkey {principal}@{self.realm}")
        self.kadmin(f"ktadd -k {keytab} {principal}@{self.realm}")

    def kinit(self, user: str, ccache: Path, lifetime: str | None = None) -> None:
        """A ticket for ``user`` in ``ccache`` (``lifetime``: kinit's -l, e.g. "6s")."""
        keytab = self.root / f"user-{user}.keytab"
        if not keytab.exists():
            self.add_user(user)
        argv = ["kinit", "-k", "-t", str(keytab), "-c", f"FILE:{ccache}"]
        if lifetime:
            argv += ["-l", lifetime]
        self._run([*argv, f"{user}@{self.realm}"])

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayKDC:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class KerberosSSHD(ThrowawaySSHD):
    """A ThrowawaySSHD restarted with GSSAPI logins against ``kdc``'s host keytab.

    ``pubkey`` False (the default) leaves gssapi-with-mic (and gssapi-keyex) as the
    only ways in. sshd's sessions (which outlive the listener) are killed in ``stop``.
    """

    def __init__(
        self,
        kdc: ThrowawayKDC,
        root: str | os.PathLike[str] | None = None,
        *,
        alias: str = "sshpyk-krb",
        pubkey: bool = False,
        key_exchange: bool = True,
    ) -> None:
        super().__init__(root, alias=alias)
        self.kdc = kdc
        self.pubkey = pubkey
        self.key_exchange = key_exchange

    def start(self, timeout: float = 10.0) -> KerberosSSHD:
        super().start(timeout)
        sshd = find_sshd()
        assert sshd is not None and self.proc is not None
        stop_process(self.proc)
        options = {
            "GSSAPIAuthentication": "yes",
            "GSSAPIStrictAcceptorCheck": "no",
            "GSSAPIKeyExchange": "yes" if self.key_exchange else "no",
            "GSSAPICleanupCredentials": "yes",
            "PubkeyAuthentication": "yes" if self.pubkey else "no",
        }
        argv = [sshd, "-D", "-e"]
        for key, value in options.items():
            argv += ["-o", f"{key}={value}"]
        env = {
            **os.environ,
            **self.kdc.env,
            "KRB5_KTNAME": f"FILE:{self.kdc.host_keytab}",
        }
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "-f", str(self.root / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        if not self._wait_listening(timeout):
            raise RuntimeError(f"GSSAPI sshd did not start: {self.log_file.read_text()[-2000:]}")
        return self

    def session_pids(self) -> list[int]:
        """The pids of this sshd's session processes (children of the listener)."""
        if self.proc is None:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        ).stdout
        return [int(p) for p in out.split()]

    def stop(self) -> None:
        sessions = self.session_pids()
        super().stop()
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
