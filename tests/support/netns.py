"""A bastion topology in network namespaces, each host with its own OpenSSH sshd.

::

    root namespace (us)
      │ veth 10.231.K.0/30
    spk-bastion   (namespace B1, sshd on 10.231.K.2:22)
      │ veth 10.231.K.4/30          │ veth 10.231.K.8/30
    spk-internal  (I, .6:22)      spk-bastion2  (B2, .10:22 and .10:2200)
                                    │ veth 10.231.K.12/30     (:2200 refuses sessions)
                                  spk-deep     (D, .14:22)

Only the bastion is reachable from the root namespace: no namespace forwards
(``ip_forward`` is 0 in a new namespace) and the root namespace gets an
``unreachable 10.231.K.0/24`` route, so nothing of ours ever leaves the machine.
The ``10.231.K.0/24`` block is used only on these veths; ``K`` is picked under a
lock so that concurrent runs do not collide, and a block already in use on this
machine is never picked.

Everything else lives in one temp dir: fresh host keys per host, one client key
per sshd (so only the right ``IdentityFile`` logs in), a generated ssh config
(``ssh_config``, which ``Include``\\ s ``conf.d/*.conf`` and selects keys with
``Match``), a pinned ``known_hosts`` and a ``known_hosts_changed`` that holds a
wrong key for the bastion.

Needs root, ``ip`` (iproute2) and sshd: :func:`unavailable_reason` says why not.
``python -m tests.support.netns`` runs one in the foreground.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .sshd import find_sshd, keygen, stop_process

__all__ = ["IsolatedHost", "NetnsHost", "Topology", "unavailable_reason"]

PREFIX = "spk"  # namespace and veth names: spk<K><suffix>
SUBNET = "10.231"  # 10.231.K.0/24 per topology
LOCK_FILE = Path(tempfile.gettempdir()) / "sshpyk-netns.lock"
_ip_path: str | None = shutil.which("ip")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_ip_path or "ip", *args], capture_output=True, text=True, check=check, timeout=20
    )


def unavailable_reason() -> str | None:
    """Why namespaces with sshds cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if _ip_path is None:
        return "iproute2 `ip` is not installed (apt-get install iproute2)"
    if find_sshd() is None:
        return "OpenSSH sshd is not installed (apt-get install openssh-server)"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        veth = _ip(
            "-n",
            probe,
            "link",
            "add",
            "spkprobe0",
            "type",
            "veth",
            "peer",
            "spkprobe1",
            check=False,
        )
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip() or veth.returncode}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class NetnsHost:
    """One namespace with its sshd."""

    name: str  # short role: bastion, internal, bastion2, deep
    alias: str  # its Host in the generated ssh config
    netns: str
    address: str  # where its sshd listens (port 22, and extra_ports)
    extra_ports: tuple[int, ...] = ()
    sshd_extra: str = ""  # appended to its sshd_config
    dir: Path = Path()
    host_pub: str = ""
    client_key: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    log_file: Path = Path()
    addresses: list[tuple[str, str]] = field(default_factory=list)  # (veth, cidr)

    def sshd_log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Topology:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager).

    :meth:`stop` removes everything :meth:`start` made, even after a failed start.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="sshpyk-netns-"))
        self.user = getpass.getuser()
        self.index: int | None = None
        self.hosts: dict[str, NetnsHost] = {}
        self.root_veth = ""
        self._route = ""
        self._veths: list[str] = []  # root-namespace ends
        self.ssh_config = self.root / "ssh_config"
        self.conf_dir = self.root / "conf.d"
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts_changed = self.root / "known_hosts_changed"

    # -- addresses -------------------------------------------------------------------
    def addr(self, last: int) -> str:
        return f"{SUBNET}.{self.index}.{last}"

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.index}"

    def host(self, name: str) -> NetnsHost:
        return self.hosts[name]

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> Topology:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        os.makedirs("/run/sshd", exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with open(LOCK_FILE, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    self._reap_stale()
                    self.index = self._free_index()
                    self._make_network()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            self._make_keys()
            for host in self.hosts.values():
                self._start_sshd(host)
            for host in self.hosts.values():
                self._wait_listening(host, timeout)
            self._write_known_hosts()
            self._write_config()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for host in self.hosts.values():
            self._stop_sshd(host)
        for host in self.hosts.values():
            self._kill_namespace_processes(host.netns)
            _ip("netns", "del", host.netns, check=False)
        for veth in self._veths:  # gone with their peers; make sure
            if _ip("link", "show", veth, check=False).returncode == 0:
                _ip("link", "del", veth, check=False)
        if self._route:
            _ip("route", "del", *self._route.split(), check=False)
            self._route = ""
        self.hosts.clear()
        self._veths.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- network ---------------------------------------------------------------------
    def _free_index(self) -> int:
        in_use = _ip("-o", "-4", "addr", check=False).stdout + _ip("route", check=False).stdout
        taken = {int(m) for m in re.findall(rf"{re.escape(SUBNET)}\.(\d+)\.", in_use)}
        names = _ip("netns", "list", check=False).stdout
        taken |= {int(m) for m in re.findall(rf"^{PREFIX}(\d+)-", names, re.M)}
        for index in range(1, 255):
            if index not in taken:
                return index
        raise RuntimeError(f"no free {SUBNET}.K.0/24 block for a test topology")

    def _reap_stale(self) -> None:
        """Remove namespaces left by a test process that was killed (its pid is gone)."""
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            match = re.match(rf"^({PREFIX}(\d+)-(\w+)-p(\d+))\b", line)
            if not match or Path(f"/proc/{match.group(4)}").exists():
                continue
            self._kill_namespace_processes(match.group(1))
            _ip("netns", "del", match.group(1), check=False)
            route = f"unreachable {SUBNET}.{match.group(2)}.0/24"
            if route in _ip("route", check=False).stdout:
                _ip("route", "del", *route.split(), check=False)

    def _netns_name(self, role: str) -> str:
        return f"{self.prefix}-{role}-p{os.getpid()}"

    def _make_network(self) -> None:
        roles = {"bastion": "b1", "internal": "in", "bastion2": "b2", "deep": "dp"}
        for name, role in roles.items():
            netns = self._netns_name(role)
            _ip("netns", "add", netns)
            self.hosts[name] = NetnsHost(
                name=name, alias=f"spk-{name}", netns=netns, address="", dir=self.root / name
            )
            _ip("-n", netns, "link", "set", "lo", "up")
        b1, inner, b2, deep = (self.hosts[n] for n in roles)
        # root <-> bastion
        self.root_veth = f"{self.prefix}r0"
        self._veths.append(self.root_veth)
        self._link(None, self.root_veth, b1, f"{self.prefix}b0", 1, 2)
        self._link(b1, f"{self.prefix}b1", inner, f"{self.prefix}i0", 5, 6)
        self._link(b1, f"{self.prefix}b2", b2, f"{self.prefix}c0", 9, 10)
        self._link(b2, f"{self.prefix}c1", deep, f"{self.prefix}d0", 13, 14)
        b1.address, inner.address = self.addr(2), self.addr(6)
        b2.address, deep.address = self.addr(10), self.addr(14)
        b2.extra_ports = (2200,)
        # a jump-only port, as hardened bastions have: forwarding yes, sessions no
        b2.sshd_extra = "Match LocalPort 2200\n  MaxSessions 0\n"
        # Everything else in our block stays on this machine.
        self._route = f"unreachable {SUBNET}.{self.index}.0/24"
        _ip("route", "add", *self._route.split())

    def _link(
        self,
        left: NetnsHost | None,
        left_dev: str,
        right: NetnsHost,
        right_dev: str,
        a: int,
        b: int,
    ) -> None:
        """A veth pair left_dev (.a/30) <-> right_dev (.b/30); left None = root namespace."""
        where = ["-n", left.netns] if left else []
        _ip(*where, "link", "add", left_dev, "type", "veth", "peer", "name", right_dev)
        _ip(*where, "link", "set", right_dev, "netns", right.netns)
        _ip(*where, "addr", "add", f"{self.addr(a)}/30", "dev", left_dev)
        _ip(*where, "link", "set", left_dev, "up")
        _ip("-n", right.netns, "addr", "add", f"{self.addr(b)}/30", "dev", right_dev)
        _ip("-n", right.netns, "link", "set", right_dev, "up")
        if left:
            left.addresses.append((left_dev, f"{self.addr(a)}/30"))
        right.addresses.append((right_dev, f"{self.addr(b)}/30"))

    def _kill_namespace_processes(self, netns: str) -> None:
        """Processes left in a namespace we made: sshd session children, kernels."""
        out = _ip("netns", "pids", netns, check=False).stdout.split()
        for pid in out:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)

    # -- sshds -------------------------------------------------------------------------
    def _make_keys(self) -> None:
        self.conf_dir.mkdir(exist_ok=True)
        for host in self.hosts.values():
            host.dir.mkdir(exist_ok=True)
            host.host_pub = keygen(host.dir / "host_ed25519", f"host-{host.name}")
            host.client_key = self.root / f"id_{host.name}"
            if host.name == "deep":  # internal hosts share a key, selected by Match
                host.client_key = self.root / "id_internal"
            if not host.client_key.exists():
                keygen(host.client_key, f"client-{host.name}")
            authorized = host.dir / "authorized_keys"
            authorized.write_text(host.client_key.with_suffix(".pub").read_text())
            os.chmod(authorized, 0o600)
        keygen(self.root / "other_host", "other-host")

    def _start_sshd(self, host: NetnsHost) -> None:
        sshd = find_sshd()
        assert sshd is not None
        listen = "".join(
            f"ListenAddress {host.address}:{port}\n" for port in (22, *host.extra_ports)
        )
        config = host.dir / "sshd_config"
        config.write_text(
            f"""{listen}HostKey {host.dir / "host_ed25519"}
PidFile {host.dir / "sshd.pid"}
AuthorizedKeysFile {host.dir / "authorized_keys"}
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
UseDNS no
MaxSessions 200
MaxStartups 100:30:200
LogLevel VERBOSE
{host.sshd_extra}"""
        )
        host.log_file = host.dir / "sshd.log"
        with open(host.log_file, "wb") as log:
            host.proc = subprocess.Popen(
                [
                    _ip_path or "ip",
                    "netns",
                    "exec",
                    host.netns,
                    sshd,
                    "-D",
                    "-e",
                    "-f",
                    str(config),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def _wait_listening(self, host: NetnsHost, timeout: float) -> None:
        """sshd logs "Server listening on ADDR port P." once per ListenAddress."""
        wanted = 1 + len(host.extra_ports)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.proc is None or host.proc.poll() is not None:
                break
            if host.sshd_log().count("Server listening on") >= wanted:
                return
            time.sleep(0.02)
        raise RuntimeError(
            f"sshd for {host.alias} in {host.netns} did not start: {host.sshd_log()[-2000:]}"
        )

    def _stop_sshd(self, host: NetnsHost) -> None:
        proc, host.proc = host.proc, None
        if proc is not None:
            stop_process(proc)

    # -- client side -------------------------------------------------------------------
    def _write_known_hosts(self) -> None:
        lines = []
        for host in self.hosts.values():
            kind, key = host.host_pub.split()[:2]
            lines.append(f"{host.address} {kind} {key}")
            lines += [f"[{host.address}]:{port} {kind} {key}" for port in host.extra_ports]
        self.known_hosts.write_text("\n".join(lines) + "\n")
        # A wrong key for every host: the *-badkey aliases check against this file.
        kind, key = (self.root / "other_host.pub").read_text().split()[:2]
        self.known_hosts_changed.write_text(
            "".join(f"{host.address} {kind} {key}\n" for host in self.hosts.values())
        )

    def _write_config(self) -> None:
        b1, inner, b2, deep = (self.hosts[n] for n in ("bastion", "internal", "bastion2", "deep"))
        # Host blocks live in an included file; keys for the hosts behind the bastions are
        # chosen by Match blocks (each sshd accepts one client key only, so a Match that
        # did not apply fails the login).
        (self.conf_dir / "hosts.conf").write_text(
            f"""# generated by tests/support/netns.py: the hosts
Host {b1.alias}
  HostName {b1.address}

Host spk-bastion-badkey
  HostName {b1.address}
  UserKnownHostsFile {self.known_hosts_changed}

Host {b2.alias}
  HostName {b2.address}
  ProxyJump {b1.alias}

Host spk-bastion2-badkey
  HostName {b2.address}
  UserKnownHostsFile {self.known_hosts_changed}

Host {inner.alias} spk-internal-again
  HostName {inner.address}
  ProxyJump {b1.alias}

Host spk-internal-badkey
  HostName {inner.address}
  ProxyJump {b1.alias}
  UserKnownHostsFile {self.known_hosts_changed}

Host spk-internal-badbastion
  HostName {inner.address}
  ProxyJump spk-bastion-badkey

Host {deep.alias}
  HostName {deep.address}
  ProxyJump {b1.alias},{b2.alias}

Host spk-deep-badmiddle
  HostName {deep.address}
  ProxyJump {b1.alias},spk-bastion2-badkey

Host spk-deep-nested
  HostName {deep.address}
  ProxyJump {b2.alias}

Host spk-deep-userport
  HostName {deep.address}
  ProxyJump {b1.alias},{self.user}@{b2.address}:2200

Host spk-loop-a
  HostName {inner.address}
  ProxyJump spk-loop-b

Host spk-loop-b
  HostName {b1.address}
  ProxyJump spk-loop-a
"""
        )
        (self.conf_dir / "keys.conf").write_text(
            f"""# generated by tests/support/netns.py: which key for which host
Match originalhost {b1.alias},spk-bastion-badkey,spk-loop-*
  IdentityFile {b1.client_key}

Match host {b2.address}
  IdentityFile {b2.client_key}

Match originalhost spk-internal*,spk-deep*
  IdentityFile {inner.client_key}
"""
        )
        self.ssh_config.write_text(
            f"""# generated by tests/support/netns.py
Include {self.conf_dir}/*.conf

Host *
  User {self.user}
  IdentitiesOnly yes
  UserKnownHostsFile {self.known_hosts}
  StrictHostKeyChecking yes
"""
        )

    # -- observations --------------------------------------------------------------------
    def established(self, name: str, port: int = 22) -> list[str]:
        """Peers of the established TCP connections to host ``name``'s sshd on ``port``."""
        host = self.hosts[name]
        out = subprocess.run(
            [_ip_path or "ip", "netns", "exec", host.netns, "ss", "-Htn", "state", "established"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout
        peers = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[-2] == f"{host.address}:{port}":
                peers.append(fields[-1])
        return peers


class IsolatedHost(Topology):
    """One remote host in a network namespace of its own, its sshd on ``10.231.K.2:22``,
    reached from the root namespace over one veth pair (alias ``spk-remote``)::

        root namespace (us)  10.231.K.1 ── veth ── 10.231.K.2  spk-remote (namespace R)

    Its loopback is its own (``lo`` is up there): a server the remote kernel binds on
    ``127.0.0.1:P`` is not ``127.0.0.1:P`` here, as on a real remote machine. The
    processes, users and files are this machine's (the remote Python is the tests'
    one). Same lifecycle, lock, leftover reaping and ``unreachable`` route as
    :class:`Topology`; the Topology's bastion hosts are not made.
    """

    ALIAS = "spk-remote"

    @property
    def remote(self) -> NetnsHost:
        return self.hosts["remote"]

    def _make_network(self) -> None:
        netns = self._netns_name("rm")
        _ip("netns", "add", netns)
        host = NetnsHost(
            name="remote", alias=self.ALIAS, netns=netns, address="", dir=self.root / "remote"
        )
        self.hosts["remote"] = host
        _ip("-n", netns, "link", "set", "lo", "up")
        self.root_veth = f"{self.prefix}r0"
        self._veths.append(self.root_veth)
        self._link(None, self.root_veth, host, f"{self.prefix}m0", 1, 2)
        host.address = self.addr(2)
        self._route = f"unreachable {SUBNET}.{self.index}.0/24"
        _ip("route", "add", *self._route.split())

    def _write_config(self) -> None:
        host = self.remote
        self.ssh_config.write_text(
            f"""# generated by tests/support/netns.py (IsolatedHost)
Host {host.alias}
  HostName {host.address}
  IdentityFile {host.client_key}

Host *
  User {self.user}
  IdentitiesOnly yes
  UserKnownHostsFile {self.known_hosts}
  StrictHostKeyChecking yes
"""
        )

    # -- running things on the remote -----------------------------------------------------
    def argv(self, *argv: str, uid: int | None = None, gid: int | None = None) -> list[str]:
        """``argv`` to run inside the remote's namespace; as ``uid``:``gid`` (no
        supplementary groups) when given, else as us."""
        command = [_ip_path or "ip", "netns", "exec", self.remote.netns]
        if uid is not None:
            drop = ["--reuid", str(uid), "--regid", str(gid if gid is not None else uid)]
            command += [shutil.which("setpriv") or "setpriv", *drop, "--clear-groups", "--"]
        return command + list(argv)

    def listening(self) -> set[int]:
        """The TCP ports something listens on inside the remote's namespace."""
        out = subprocess.run(
            self.argv("ss", "-Hltn"), capture_output=True, text=True, check=True, timeout=20
        ).stdout
        ports = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4:
                ports.add(int(fields[3].rsplit(":", 1)[1]))
        return ports


if __name__ == "__main__":
    why = unavailable_reason()
    if why:
        sys.exit(f"cannot build the topology: {why}")
    with Topology() as topo:
        for h in topo.hosts.values():
            print(f"{h.alias:14} {h.address:16} netns {h.netns}", flush=True)
        print(f"ssh -F {topo.ssh_config} spk-internal", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)
