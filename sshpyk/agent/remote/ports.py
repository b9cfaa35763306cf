"""Web apps a kernel starts: the TCP listeners of a kernel's processes, found by
scanning /proc once a second for all kernels together (no thread, no polling per
kernel), so that the local side can forward each one to the same port on the user's
machine (TensorBoard, Dash, Bokeh, Streamlit, Dask and Ray dashboards...).

A listener is a kernel's when:

- it listens on TCP (IPv4 or IPv6), on a loopback address or on any address (a server
  bound to one interface's address is meant for that network, not for us);
- its owner (/proc/net/tcp's uid) is this user, and a process of this user holds it;
- that process is the kernel or a descendant of it (in its process tree, read from
  /proc/PID/task/TID/children), or it carries the kernel's ``SSHPYK_RUN_DIR`` in its
  environment: a server that detached into a session of its own and was re-parented
  keeps it;
- it is none of the kernel's own sockets: a tcp kernel's five ZMQ ports, and any
  other ZMQ socket (ipykernel's output pipe for subprocesses listens on loopback): a
  new listener is probed once, and one that greets with ZMTP's signature right after
  the connect (as every ZMQ socket does; a web server waits for its request) is not
  a web app.

The cost: one NETLINK_SOCK_DIAG dump of the LISTEN sockets each tick (/proc/net/tcp
and tcp6 where netlink is not available: far dearer, as they walk every connection
bucket); only when a listener appears that was not seen before, the fd tables of the
kernels' descendants (from /proc/PID/task/TID/children), and if it is none of theirs,
those of all of this user's processes, once per listener. Linux only: elsewhere
nothing is found (explicit forwards still work).
"""

import os
import select
import socket
import struct

_LISTEN = "0A"
#: seconds a new listener has to greet like ZMQ (it does at once; HTTP never does)
ZMTP_PROBE = 0.1
PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")


def _where(raw):
    """(host to connect to, family) for a listener's raw address (4 or 16 bytes, network
    order), or None when it is neither loopback nor any (see the module docstring)."""
    if len(raw) == 4:
        if raw == bytes(4):
            return "127.0.0.1", 4
        if raw[0] == 127:
            return ".".join(str(b) for b in raw), 4
        return None
    if raw == bytes(16) or raw == bytes(15) + b"\x01":
        return "::1", 6
    if raw[:12] == bytes(10) + b"\xff\xff":  # IPv4-mapped
        return _where(raw[12:])
    return None


def _address(hex_address):
    """:func:`_where` of an address as /proc/net/tcp{,6} writes it (little-endian words)."""
    if len(hex_address) not in (8, 32):
        return None
    try:
        words = [bytes.fromhex(hex_address[i : i + 8]) for i in range(0, len(hex_address), 8)]
    except ValueError:
        return None
    return _where(b"".join(w[::-1] for w in words))


def _proc_listening(uid, paths):
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


#: NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1 << TCP_LISTEN
_SOCK_DIAG, _BY_FAMILY, _DUMP, _TCPF_LISTEN = 4, 20, 0x301, 1 << 10
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
#: netlink messages read at most per family (each holds many sockets)
_MAX_READS = 10000


def _netlink_listening(uid):
    """The same through NETLINK_SOCK_DIAG, asking for LISTEN sockets only: the kernel
    walks its listening hash, where reading /proc/net/tcp walks every bucket of the
    established one (measured: 0.08 ms against 8 ms a read on a host whose table has
    262144 buckets; benchmarks/webports.py). OSError where it is not available."""
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _SOCK_DIAG) as nl:
        nl.settimeout(5)
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            # inet_diag_req_v2: family, protocol, ext, pad, states, a zero inet_diag_sockid
            request = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, _TCPF_LISTEN)
            request += bytes(48)
            header = struct.pack("=IHHII", 16 + len(request), _BY_FAMILY, _DUMP, seq, 0)
            nl.send(header + request)
            done = False
            for _ in range(_MAX_READS):  # until NLMSG_DONE (bounded)
                data, off = nl.recv(1 << 16), 0
                while off + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, off)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError("sock_diag: netlink error")
                    # inet_diag_msg: family, state, timer, retrans; sockid (sport, dport,
                    # src[16], dst[16], if, cookie[8]); expires, rqueue, wqueue, uid, inode
                    port = struct.unpack_from(">H", data, off + 20)[0]
                    raw = data[off + 24 : off + 24 + (4 if family == socket.AF_INET else 16)]
                    owner, inode = struct.unpack_from("=II", data, off + 80)
                    where = _where(raw)
                    if owner == uid and inode and where is not None:
                        found[inode] = (port, where[0], where[1])
                    off += max(16, (length + 3) & ~3)
                if done:
                    break
    return found


def listening(uid, paths=None):
    """{inode: (port, host, family)} of the TCP listeners of ``uid`` on loopback or
    any address: by netlink, else from /proc/net/tcp{,6} (or ``paths``)."""
    if paths is None:
        try:
            return _netlink_listening(uid)
        except (OSError, AttributeError, struct.error):  # no AF_NETLINK (macOS), no sock_diag
            paths = PROC_NET
    return _proc_listening(uid, paths)


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


#: processes at most in one kernel's tree
_MAX_TREE = 4096


def descendants(pid):
    """``pid`` and its descendants, from /proc/PID/task/TID/children (bounded)."""
    found, todo = [], [pid]
    while todo and len(found) < _MAX_TREE:  # ends with the tree, or at the bound
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir("/proc/%d/task" % current)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (current, task)) as f:
                    todo.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):
                continue
    return found


def socket_owners(inodes, uid, pids=None):
    """{inode: pid} for the sockets ``inodes``, from the fd tables of ``pids`` (default:
    every process of ``uid``); stops once every one is found."""
    wanted = set(inodes)
    owners = {}
    if pids is None:
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
    (every key, sorted by port; one entry per port, IPv4 preferred). A listener is
    attributed once, when first seen: use one key per kernel process (a restarted
    kernel is a new one, and what its previous process left running is not its)."""

    def __init__(self, uid=None):
        self.uid = os.getuid() if uid is None else uid
        self.known = {}  # inode -> key (None: not a watched kernel's)

    def scan(self, kernels, paths=None):
        found = listening(self.uid, paths)
        for inode in [i for i in self.known if i not in found]:
            del self.known[inode]  # closed
        new = [i for i in found if i not in self.known]
        if new:
            # the kernels' process trees: whose each process is
            tree = {}
            for key, (pid, _, _) in kernels.items():
                if pid:
                    tree.update((p, key) for p in descendants(pid))
            by_dir = {os.path.realpath(d): key for key, (_, d, _) in kernels.items() if d}
            owners = socket_owners(new, self.uid, list(tree))
            rest = [i for i in new if i not in owners]
            if rest:  # a detached process (re-parented), or not a kernel's at all
                owners.update(socket_owners(rest, self.uid))
            for inode in new:
                key = self._kernel_of(owners.get(inode), tree, by_dir)
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
            current = result[key].get(port)
            if current is None or (family == 4 and current["family"] == 6):
                result[key][port] = {"port": port, "host": host, "family": family}
        return {
            key: [{"port": e["port"], "host": e["host"]} for _, e in sorted(ports.items())]
            for key, ports in result.items()
        }

    @staticmethod
    def _kernel_of(pid, tree, by_dir):
        """The key of the kernel whose process ``pid`` is: in a kernel's tree, or
        carrying its SSHPYK_RUN_DIR (a detached, re-parented one)."""
        if not pid:
            return None
        if pid in tree:
            return tree[pid]
        run_dir = _run_dir_of(pid)
        if run_dir:
            return by_dir.get(os.path.realpath(run_dir))
        return None
