"""Web apps a kernel starts: the TCP listeners of a kernel's processes, found by
scanning /proc once a second for all kernels together (no thread, no polling per
kernel), so that the local side can forward each one to the same port on the user's
machine (TensorBoard, Dash, Bokeh, Streamlit, Dask and Ray dashboards...).

A listener is a kernel's when:

- it listens on TCP (IPv4 or IPv6), on a loopback address or on any address (a server
  bound to one interface's address is meant for that network, not for us);
- its owner (/proc/net/tcp's uid) is this user, and a process of this user holds it;
- that process is the kernel or a descendant of it (its parent chain reaches the
  kernel), or it carries the kernel's ``SSHPYK_RUN_DIR`` in its environment: a server
  that detached into a session of its own and was re-parented keeps it;
- it is none of the kernel's own sockets: a tcp kernel's five ZMQ ports, and any
  other ZMQ socket (ipykernel's output pipe for subprocesses listens on loopback): a
  new listener is probed once, and one that greets with ZMTP's signature right after
  the connect (as every ZMQ socket does; a web server waits for its request) is not
  a web app.

The cost: reading /proc/net/tcp and tcp6 each tick (only LISTEN lines are parsed);
the fd tables of this user's processes are read only when a listener appears that was
not seen before. Linux only: where /proc/net/tcp does not exist nothing is found
(explicit forwards still work).
"""

import os
import select
import socket

_LISTEN = "0A"
#: seconds a new listener has to greet like ZMQ (it does at once; HTTP never does)
ZMTP_PROBE = 0.1
#: parent links followed at most from a process up to its kernel
_MAX_DEPTH = 64
PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")


def _address(hex_address):
    """(host to connect to, family) for a listener's address, or None when it is
    neither loopback nor any (see the module docstring)."""
    if len(hex_address) == 8:  # IPv4, one little-endian word
        value = int(hex_address, 16)
        octets = [(value >> shift) & 0xFF for shift in (0, 8, 16, 24)]
        if octets == [0, 0, 0, 0]:
            return "127.0.0.1", 4
        if octets[0] == 127:
            return ".".join(str(o) for o in octets), 4
        return None
    if len(hex_address) == 32:  # IPv6, four little-endian words
        words = [hex_address[i : i + 8] for i in range(0, 32, 8)]
        raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
        if raw == bytes(16):
            return "::1", 6
        if raw == bytes(15) + b"\x01":
            return "::1", 6
        if raw[:12] == bytes(10) + b"\xff\xff":  # IPv4-mapped
            if raw[12:] == bytes(4):
                return "127.0.0.1", 4
            if raw[12] == 127:
                return ".".join(str(b) for b in raw[12:]), 4
        return None
    return None


def listening(uid, paths=PROC_NET):
    """{inode: (port, host, family)} of the TCP listeners of ``uid`` on loopback or
    any address."""
    found = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        for line in data.decode("ascii", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            try:
                owner = int(fields[7])
                inode = int(fields[9])
                address, port_hex = fields[1].split(":")
                port = int(port_hex, 16)
            except ValueError:
                continue
            if owner != uid or not inode:
                continue
            where = _address(address)
            if where is not None:
                found[inode] = (port, where[0], where[1])
    return found


def _ppid(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return int(f.read().rsplit(b") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _run_dir_of(pid):
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read(4 << 20)
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"SSHPYK_RUN_DIR="):
            return os.fsdecode(entry[len(b"SSHPYK_RUN_DIR=") :])
    return None


def socket_owners(inodes, uid):
    """{inode: pid} for the sockets ``inodes``, from the fd tables of ``uid``'s
    processes (stops once every one is found)."""
    wanted = set(inodes)
    owners = {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return owners
    for pid in pids:
        if not wanted:
            break
        base = "/proc/%d" % pid
        try:
            if os.stat(base).st_uid != uid:
                continue
            fds = os.listdir(base + "/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink("%s/fd/%s" % (base, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                try:
                    inode = int(target[8:-1])
                except ValueError:
                    continue
                if inode in wanted:
                    wanted.discard(inode)
                    owners[inode] = pid
    return owners


def speaks_zmtp(host, port, timeout=ZMTP_PROBE):
    """True if what listens on ``host``:``port`` greets a new connection with ZMTP's
    signature (0xFF, 8 bytes, 0x7F) within ``timeout`` seconds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(timeout)
            probe.connect((host, port))
            greeting = b""
            # ends with 10 bytes, EOF, or the timeout
            while len(greeting) < 10 and select.select([probe], [], [], timeout)[0]:
                chunk = probe.recv(10 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
    except OSError:
        return False
    return len(greeting) == 10 and greeting[0] == 0xFF and greeting[9] == 0x7F


class PortScanner:
    """Which kernel holds which listener. :meth:`scan` takes the kernels to watch,
    ``{key: (pid, run_dir, own_ports)}``, and returns ``{key: [{"port", "host"}]}``
    (every key, sorted by port; one entry per port, IPv4 preferred)."""

    def __init__(self, uid=None):
        self.uid = os.getuid() if uid is None else uid
        self.known = {}  # inode -> key (None: not a watched kernel's)

    def scan(self, kernels, paths=PROC_NET):
        found = listening(self.uid, paths)
        for inode in [i for i in self.known if i not in found]:
            del self.known[inode]  # closed
        new = [i for i in found if i not in self.known]
        if new:
            by_pid = {pid: key for key, (pid, _, _) in kernels.items() if pid}
            by_dir = {os.path.realpath(d): key for key, (_, d, _) in kernels.items() if d}
            owners = socket_owners(new, self.uid)
            for inode in new:
                key = self._kernel_of(owners.get(inode), by_pid, by_dir)
                if key is not None:
                    port, host, _ = found[inode]
                    if port in kernels[key][2] or speaks_zmtp(host, port):
                        key = None  # the kernel's own sockets, or ZMQ: not a web app
                self.known[inode] = key
        result = {key: {} for key in kernels}
        for inode, key in self.known.items():
            if key not in result:
                continue  # a kernel no longer watched
            port, host, family = found[inode]
            if port in kernels[key][2]:
                continue  # the kernel's own ZMQ sockets
            current = result[key].get(port)
            if current is None or (family == 4 and current["family"] == 6):
                result[key][port] = {"port": port, "host": host, "family": family}
        return {
            key: [{"port": e["port"], "host": e["host"]} for _, e in sorted(ports.items())]
            for key, ports in result.items()
        }

    @staticmethod
    def _kernel_of(pid, by_pid, by_dir):
        if not pid:
            return None
        current = pid
        for _ in range(_MAX_DEPTH):  # up the parent chain, bounded
            if current in by_pid:
                return by_pid[current]
            current = _ppid(current)
            if current <= 1:
                break
        run_dir = _run_dir_of(pid)
        if run_dir:
            return by_dir.get(os.path.realpath(run_dir))
        return None

    def forget(self, key):
        """``key`` is no longer watched (its kernel ended)."""
        for inode in [i for i, k in self.known.items() if k == key]:
            self.known[inode] = None
