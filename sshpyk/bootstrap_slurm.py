"""The SLURM launcher, remote side: an extension of ``bootstrap.py`` (stdlib only,
Python >= 3.8), never imported locally.

The local side sends this source in a ``load`` request before its first SLURM request
(``launch`` with ``launcher: slurm``, ``slurm_info``, ``ps`` of a host with SLURM
kernels); the agent compiles it into its own namespace, so the names of
``bootstrap.py`` (``Kernel``, ``emit``, ``BootstrapError``...) are used here directly,
and agents that only run direct kernels never compile it.

On the login node, :class:`SlurmKernel` submits a kernel with ``srun``; on the compute
node, :func:`run_node` (node mode: the same two sources, fed to the remote python
through srun's stdin) starts it and relays signal and stop requests.
"""

# ruff: noqa: UP031, UP041, B905

import collections
import hashlib
import hmac
import json
import os
import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # at run time these names are bootstrap.py's, in the same namespace
    from sshpyk.bootstrap import (
        CHANNELS,
        MAX_IPC_PREFIX,
        PROTOCOL,
        TERM_WAIT,
        BootstrapError,
        Kernel,
        emit,
        endpoints_bound,
        find_kernelspec,
        kernel_argv,
        pick_transport,
        pid_alive,
        private_run_dir,
        spawn_kernel,
        tail,
        write_connection_file,
    )

# -- SLURM: the login node side -----------------------------------------------------------

#: srun's command on the compute node: bootstrap.py's source (the agent's loader keeps
#: it in SSHPYK_SOURCE) then this one arrive first on stdin, then the ``node`` request
NODE_LOADER = (
    "import sys;SSHPYK_SOURCE=sys.stdin.buffer.read(%d);"
    "SSHPYK_SLURM=sys.stdin.buffer.read(%d);"
    "exec(compile(SSHPYK_SOURCE,'sshpyk-node','exec'))"
)
#: seconds between squeue polls while a job is pending
SLURM_POLL = 2.0
#: bound on every SLURM client command (slurmctld may be slow or down)
SLURM_COMMAND_TIMEOUT = 15.0
#: after scancel, how long to wait for the job to leave the queue
SLURM_GONE_WAIT = 15.0
#: job states after which nothing of the job runs any more
SLURM_ENDED = frozenset(
    (
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    )
)
_SRUN_JOB_RE = re.compile(r"job (\d+) (?:queued|has been allocated)", re.IGNORECASE)
_SQUEUE_FORMAT = "%i|%T|%r|%N|%L"


def last_line(text):
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def slurm_command(argv, timeout=SLURM_COMMAND_TIMEOUT):
    """Run a SLURM client command: (exit code, stdout, stderr); BootstrapError if missing."""
    path = shutil.which(argv[0])
    if path is None:
        raise BootstrapError(
            "slurm_missing",
            "%s not found on the PATH of the login node (is SLURM installed? load it in "
            "the pre-command, e.g. 'module load slurm')" % argv[0],
        )
    try:
        done = subprocess.run(
            [path] + [str(a) for a in argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise BootstrapError(
            "slurm_error", "%s did not answer within %gs" % (argv[0], timeout)
        ) from None
    except OSError as exc:
        raise BootstrapError("slurm_error", "cannot run %s: %s" % (argv[0], exc)) from None
    return (
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )


def parse_duration(text):
    """Seconds in a SLURM duration ([days-]hours:minutes:seconds, minutes:seconds, ...);
    None for UNLIMITED, NOT_SET, INVALID or anything else."""
    days = 0
    if "-" in text:
        head, text = text.split("-", 1)
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not parts or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return days * 86400 + seconds


def squeue_jobs(job_ids):
    """{job id: {state, reason, node, time_left}} for the jobs SLURM still lists."""
    ids = [str(j) for j in job_ids if j]
    if not ids:
        return {}
    code, out, err = slurm_command(["squeue", "-h", "-j", ",".join(ids), "-o", _SQUEUE_FORMAT])
    if code != 0:
        if "invalid job id" in err.lower():
            return {}  # finished and purged
        raise BootstrapError("slurm_error", "squeue failed: %s" % (last_line(err) or code))
    jobs = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        job_id, state, reason, node, left = parts
        jobs[job_id] = {
            "state": state,
            "reason": "" if reason == "None" else reason,
            "node": node or None,
            "time_left": parse_duration(left),
        }
    return jobs


def slurm_job_by_name(name):
    """The id of this user's newest job called ``name``, or None."""
    code, out, _ = slurm_command(["squeue", "-h", "-u", str(os.getuid()), "-n", name, "-o", "%i"])
    ids = [line.strip() for line in out.splitlines() if line.strip().isdigit()]
    return ids[-1] if code == 0 and ids else None


def scancel(job_id, wait=SLURM_GONE_WAIT):
    """Cancel a job unless it ended already, then wait (bounded) until it is gone."""
    jobs = squeue_jobs([job_id])
    if str(job_id) not in jobs or jobs[str(job_id)]["state"] in SLURM_ENDED:
        return
    slurm_command(["scancel", str(job_id)])
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        jobs = squeue_jobs([job_id])
        if str(job_id) not in jobs or jobs[str(job_id)]["state"] in SLURM_ENDED:
            return
        time.sleep(0.1)


def slurm_states(kernels):
    """Add the SLURM state of each SLURM kernel found by ``scan_kernels`` (one squeue)."""
    mine = [k for k in kernels if k.get("launcher") == "slurm"]
    if not mine:
        return kernels
    try:
        jobs = squeue_jobs([k.get("job_id") for k in mine])
    except BootstrapError as exc:
        jobs = None
        error = exc.message
    for k in mine:
        if jobs is None:
            k["slurm_state"], k["slurm_reason"] = "UNKNOWN", error
        elif not k.get("job_id"):
            k["slurm_state"], k["slurm_reason"] = "SUBMITTING" if k.get("alive") else "GONE", ""
        else:
            job = jobs.get(str(k["job_id"]))
            k["slurm_state"] = job["state"] if job else "GONE"
            k["slurm_reason"] = job["reason"] if job else ""
            if job and job["node"]:
                k["node"] = job["node"]
    return kernels


def slurm_info(msg):
    """Is SLURM usable from here: version, partitions, and whether srun accepts ``args``."""
    _, out, err = slurm_command(["sinfo", "--version"])
    version = out.strip() or last_line(err)
    code, out, err = slurm_command(["sinfo", "-h", "-o", "%P|%a|%D|%T"])
    if code != 0:
        raise BootstrapError("slurm_error", "sinfo failed: %s" % (last_line(err) or code))
    partitions = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            partitions.append(dict(zip(("partition", "avail", "nodes", "state"), parts)))
    test = None
    args = msg.get("args")
    if args is not None:
        srun = ["srun", "--test-only"] + [str(a) for a in args] + ["--ntasks=1", "true"]
        code, out, err = slurm_command(srun)
        test = last_line(err) or last_line(out)
        if code != 0:
            raise BootstrapError(
                "slurm_args", "srun rejects the SLURM arguments %r: %s" % (" ".join(args), test)
            )
    emit(
        "slurm_info",
        rid=msg.get("rid"),
        version=version,
        srun=shutil.which("srun"),
        partitions=partitions,
        test=test,
    )


# -- the relay: one authenticated TCP connection per kernel, multiplexed ----------------
#
# The kernel on the node binds only private sockets (ipc in the node's 0700 run dir, or
# tcp on 127.0.0.1), so nothing of it is reachable from the cluster network. Its five
# channels travel over one TCP connection from the login node's agent to the node side,
# which authenticates it before relaying a byte:
#
# - the login side draws a random secret per kernel and sends it in the ``node``
#   request over srun's stdin (never stored by SLURM, like the HMAC key);
# - the node side listens on its routable address, on an ephemeral port, and says
#   which in its ``node`` event (on srun's stdout);
# - on a connection it sends a challenge (RELAY_MAGIC + 32 random bytes); the peer
#   answers with 32 random bytes of its own and HMAC-SHA256(secret, "login" | both),
#   within RELAY_AUTH_TIMEOUT; the node answers HMAC(secret, "node" | both), which
#   the login side checks in turn (it talks to the node side, not to whoever bound
#   the port). A connection that fails is closed at once, nothing relayed; the first
#   that succeeds closes the listener, so the port is open only between the ``node``
#   event and the login side's connect (milliseconds), and the kernel's own sockets
#   never are. Both ends set TCP_NODELAY.
#
# Why not srun's stdin/stdout (measured, benchmarks/README.md): srun and slurmstepd
# forward a task's stdio over a TCP connection without TCP_NODELAY, so the second of two
# small writes in a row waits for the delayed ACK of the first (~40 ms on Linux), in
# either direction; a kernel's busy status, reply and idle status are three such writes.
# No srun option changes that (-u only ends slurmstepd's line buffering), and a burst
# cannot be coalesced into one write in general (the reply comes ~1 ms after the
# status). srun's stdio keeps the JSON control lines: the node request, its events,
# signal and stop requests, and its EOF still ends the node side.
#
# The traffic is plaintext on the cluster network, as SLURM's own I/O forwarding (and
# the HMAC-signed ZMQ messages of any remote kernel) is; what matters is that nobody
# without the secret can connect to a kernel socket. Frames, both ways:
#
#     type (1 byte) | stream id (4 bytes, big endian) | length (4) | payload
#
#     OPEN    login -> node: a connection was accepted on channel <payload> (shell...)
#     DATA    bytes of a stream
#     EOF     the sender will send no more DATA on the stream (a half-close)
#     CLOSE   the sender is done with the stream (both halves closed, or an error)
#     CREDIT  the receiver wrote <payload: 4 bytes> more bytes of the stream to its socket
#
# Flow control is per stream and credit based: a side may have at most RELAY_WINDOW
# bytes of a stream in flight (sent, not yet credited back). The reader of the mux
# connection therefore never blocks on a stream (it only appends to that stream's
# inbox, at most one window), so there is no head-of-line blocking between streams and
# no deadlock between the mux reader and a kernel socket: a stream whose peer stops
# reading (an iopub subscriber that fell behind) stalls only itself; its sender stops
# reading from the kernel's socket, which is what ZMQ sees on a slow tcp link too.
# Memory is bounded: per stream and direction one window, plus the socket buffers.

F_OPEN, F_DATA, F_EOF, F_CLOSE, F_CREDIT = range(1, 6)
_FRAME = struct.Struct(">BII")
_CREDIT = struct.Struct(">I")
#: bytes of one stream one side may have in flight before the other credits them back
RELAY_WINDOW = 1 << 20
#: largest DATA payload (one recv from a socket)
RELAY_CHUNK = 1 << 17
#: largest frame accepted at all; anything bigger is corruption
RELAY_MAX_FRAME = 1 << 22
#: credit back once this much was written (fewer, bigger CREDIT frames)
_CREDIT_BATCH = RELAY_WINDOW // 4
#: seconds a relay thread waits on its condition before looking at its flags again
_RELAY_TICK = 1.0
#: the node's challenge starts with this (a stray client sees what it reached)
RELAY_MAGIC = b"sshpyk-relay-1\n"
_NONCE = 32
#: seconds a connection has to authenticate (each one), and the login side to connect
RELAY_AUTH_TIMEOUT = 5.0
RELAY_CONNECT_TIMEOUT = 60.0


def _proof(secret, role, node_nonce, login_nonce):
    return hmac.new(secret, role + node_nonce + login_nonce, hashlib.sha256).digest()


def recv_exactly(sock, count):
    """``count`` bytes from ``sock`` (fewer only at EOF)."""
    chunks, got = [], 0
    while got < count:  # ends at count bytes or EOF (a timeout raises)
        chunk = sock.recv(count - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def relay_accept(listener, secret, deadline):
    """The node side: the first connection to ``listener`` that proves it knows
    ``secret`` (see "the relay"), with TCP_NODELAY; every other one is closed at once.
    Closes the listener either way; None if nobody authenticated before ``deadline``."""
    try:
        # ends at the deadline: every pass waits for, and times out, one connection
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            listener.settimeout(left)
            try:
                conn, _ = listener.accept()
            except OSError:  # the deadline, or run_node's shutdown of the listener
                return None
            try:
                conn.settimeout(RELAY_AUTH_TIMEOUT)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                node_nonce = os.urandom(_NONCE)
                conn.sendall(RELAY_MAGIC + node_nonce)
                answer = recv_exactly(conn, 2 * _NONCE)
                login_nonce = answer[:_NONCE]
                expected = _proof(secret, b"login", node_nonce, login_nonce)
                if len(answer) == 2 * _NONCE and hmac.compare_digest(answer[_NONCE:], expected):
                    conn.sendall(_proof(secret, b"node", node_nonce, login_nonce))
                    conn.settimeout(None)
                    return conn
            except OSError:
                pass
            conn.close()  # not the login side: nothing is relayed to it
    finally:
        listener.close()


def relay_connect(host, port, secret, timeout=RELAY_AUTH_TIMEOUT):
    """The login side: connect to the node side and authenticate both ways; raises
    OSError (ValueError for a peer that does not know the secret)."""
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = recv_exactly(sock, len(RELAY_MAGIC) + _NONCE)
        if len(challenge) != len(RELAY_MAGIC) + _NONCE or not challenge.startswith(RELAY_MAGIC):
            raise ValueError("not the node side of this kernel")
        node_nonce = challenge[len(RELAY_MAGIC) :]
        login_nonce = os.urandom(_NONCE)
        sock.sendall(login_nonce + _proof(secret, b"login", node_nonce, login_nonce))
        proof = recv_exactly(sock, 32)
        if not hmac.compare_digest(proof, _proof(secret, b"node", node_nonce, login_nonce)):
            raise ValueError("the node side did not prove it knows the relay secret")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class Mux:
    """One end of the multiplexed connection ``sock`` (authenticated, see "the relay").
    :meth:`send` writes one frame (thread safe, under ``lock``); :meth:`serve` reads
    frames until EOF. ``connect(channel)`` (the node side) opens a socket to the kernel
    for an OPEN; the login side opens streams itself (:meth:`open_stream`)."""

    def __init__(self, sock, connect=None):
        self.sock = sock
        self.connect = connect
        self.lock = threading.Lock()
        self.streams = {}
        self.streams_lock = threading.Lock()
        self.next_sid = 1
        self.closed = False

    def send(self, kind, sid, payload=b""):
        """Send one frame; False if the connection is closed (nothing is sent then)."""
        frame = _FRAME.pack(kind, sid, len(payload)) + payload
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(frame)
            except (OSError, ValueError):
                self.closed = True
                return False
        return True

    def open_stream(self, sock, channel):
        """The login side: a connection accepted on ``channel``'s socket."""
        with self.streams_lock:
            if self.closed:
                sock.close()
                return None
            sid = self.next_sid
            self.next_sid += 1
            stream = self.streams[sid] = Stream(self, sid, sock)
        if not self.send(F_OPEN, sid, channel.encode("ascii")):
            stream.abort(notify=False)
            return None
        stream.start()
        return stream

    def forget(self, sid):
        with self.streams_lock:
            self.streams.pop(sid, None)

    def serve(self):
        """Read frames until EOF or a broken frame, then :meth:`shutdown` and close the
        connection. Never blocks on a stream (see the credits above)."""
        try:
            read = self.sock.makefile("rb").read  # n bytes, fewer only at EOF
            while not self.closed:  # ends at EOF (shutdown makes one) or corruption
                head = read(_FRAME.size)
                if len(head) < _FRAME.size:
                    break
                kind, sid, length = _FRAME.unpack(head)
                if length > RELAY_MAX_FRAME:
                    break
                body = read(length)
                if len(body) != length:
                    break
                self.dispatch(kind, sid, body)
        except (OSError, ValueError):
            pass
        finally:
            self.shutdown()
            try:
                self.sock.close()
            except OSError:
                pass

    def dispatch(self, kind, sid, payload):
        with self.streams_lock:
            stream = self.streams.get(sid)
            if kind == F_OPEN and stream is None and self.connect is not None:
                stream = self.streams[sid] = Stream(self, sid)
                channel = payload.decode("ascii", "replace")
                stream.start(lambda: self.connect(channel))
                return
        if stream is None:
            return  # a stream one side closed already: its late frames are dropped
        if kind == F_DATA:
            stream.put(payload)
        elif kind == F_EOF:
            stream.put(None)
        elif kind == F_CREDIT and len(payload) == _CREDIT.size:
            stream.grant(_CREDIT.unpack(payload)[0])
        elif kind == F_CLOSE:
            stream.abort(notify=False)

    def shutdown(self):
        """The connection ended (or stop): close every stream, wake :meth:`serve`."""
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        with self.streams_lock:
            streams = list(self.streams.values())
            self.streams.clear()
        for stream in streams:
            stream.abort(notify=False)


class Stream:
    """One forwarded connection: a socket on this side, a stream id on the mux. Two
    threads: ``_outbound`` (socket -> DATA frames, within the credit the peer granted)
    and ``_inbound`` (the inbox of DATA frames -> socket, crediting back what it wrote).
    """

    def __init__(self, mux, sid, sock=None):
        self.mux = mux
        self.sid = sid
        self.sock = sock
        self.cond = threading.Condition()
        self.inbox = collections.deque()  # payloads; None for the peer's EOF
        self.queued = 0
        self.credit = RELAY_WINDOW
        self.closed = False
        self.connected = sock is not None
        self.halves = 0  # directions finished: at 2 the stream is done
        self.users = 2  # the threads still using the socket: the last one closes it

    def start(self, connect=None):
        for target, args in ((self._outbound, (connect,)), (self._inbound, ())):
            threading.Thread(target=target, args=args, daemon=True).start()

    # -- from the mux reader (must not block) --------------------------------------------
    def put(self, payload):
        with self.cond:
            if self.closed:
                return
            if payload is not None:
                self.queued += len(payload)
                if self.queued > RELAY_WINDOW:
                    overrun = True  # the peer ignored its credit
                else:
                    overrun = False
                    self.inbox.append(payload)
            else:
                overrun = False
                self.inbox.append(None)
            self.cond.notify_all()
        if overrun:
            self.abort()

    def grant(self, count):
        with self.cond:
            self.credit += count
            self.cond.notify_all()

    # -- the threads -------------------------------------------------------------------------
    def _outbound(self, connect):
        try:
            if connect is not None:
                try:
                    sock = connect()
                except (OSError, KeyError, ValueError):
                    self.abort()
                    return
                with self.cond:
                    self.sock, self.connected = sock, True
                    closed = self.closed
                    self.cond.notify_all()
                if closed:
                    return
            sock = self.sock
            while True:  # ends with the socket (EOF, error, or abort's shutdown)
                with self.cond:
                    while self.credit <= 0 and not self.closed:
                        self.cond.wait(_RELAY_TICK)
                    if self.closed:
                        return
                    size = min(self.credit, RELAY_CHUNK)
                try:
                    data = sock.recv(size)
                except OSError:
                    data = None
                if data is None:
                    self.abort()
                    return
                if not data:
                    break
                with self.cond:
                    self.credit -= len(data)
                if not self.mux.send(F_DATA, self.sid, data):
                    self.abort(notify=False)
                    return
            self.mux.send(F_EOF, self.sid)
            self._half_done()
        finally:
            self._release()

    def _inbound(self):
        unacked = 0
        try:
            with self.cond:
                while not self.connected and not self.closed:
                    self.cond.wait(_RELAY_TICK)
            while True:  # ends with the peer's EOF, or abort
                with self.cond:
                    while not self.inbox and not self.closed:
                        self.cond.wait(_RELAY_TICK)
                    if self.closed:
                        return
                    payload = self.inbox.popleft()
                if payload is None:
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self._half_done()
                    return
                try:
                    self.sock.sendall(payload)
                except OSError:
                    self.abort()
                    return
                with self.cond:
                    self.queued -= len(payload)
                unacked += len(payload)
                if unacked >= _CREDIT_BATCH:
                    # in batches: the sender keeps at least RELAY_WINDOW - _CREDIT_BATCH
                    # of credit meanwhile
                    self.mux.send(F_CREDIT, self.sid, _CREDIT.pack(unacked))
                    unacked = 0
        finally:
            self._release()

    # -- the end -----------------------------------------------------------------------------
    def _half_done(self):
        with self.cond:
            self.halves += 1
            done = self.halves >= 2
        if done:
            # both directions finished; the peer finishes on its own (a CLOSE now could
            # make it drop the last bytes it has not written to its socket yet)
            self.abort(notify=False)

    def abort(self, notify=True):
        """Close the stream now (idempotent); ``notify``: send CLOSE to the peer."""
        with self.cond:
            if self.closed:
                return
            self.closed = True
            self.inbox.clear()
            sock = self.sock
            self.cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
            except OSError:
                pass
        self.mux.forget(self.sid)
        if notify:
            self.mux.send(F_CLOSE, self.sid)

    def _release(self):
        with self.cond:
            self.users -= 1
            last = self.users == 0
            sock = self.sock
        if last and sock is not None:
            try:
                sock.close()
            except OSError:
                pass


class SlurmKernel(Kernel):
    """A kernel run as a SLURM job: ``srun`` here on the login node, the kernel on a
    compute node, where this same source runs in node mode (:func:`run_node`).

    Why srun and not sbatch:

    - srun's stdin reaches the job: the node side's code and the HMAC key travel over
      it (no shared file system needed; the key is never stored by SLURM as an sbatch
      script or an ``--export`` value would be), then signal and stop requests; srun's
      stdout brings the node's events back. One SSH connection, no extra files.
    - the job lives as long as srun, a child of this agent: if the agent dies, even by
      SIGKILL, srun's stdin ends, the node side stops the kernel and the job ends; if
      srun itself is killed, slurmstepd closes the task's stdin and the same happens.
      A batch job would run on, holding its allocation, until its time limit.
    - the kernel starts ~0.1 s after submission when resources are free; a batch job
      waits for the scheduler's batch cycle.

    Signals never go to srun itself (a SIGINT makes it print the step's status, a second
    one within a second kills the step): an interrupt travels as a ``signal`` line over
    srun's stdin and the node side signals the kernel's process group, exactly what the
    direct launcher does, without a round trip through slurmctld (scancel --signal).
    On the node the kernel is the node side's child, with JPY_PARENT_PID set to it:
    ipykernel's ParentPollerUnix exits the kernel when its parent changes (slurmstepd
    would be its parent otherwise, and it checks only for init then).
    """

    polls_ready = False
    launcher = "slurm"

    def __init__(self, agent, request):
        Kernel.__init__(self, agent, request)
        self.job_id = None
        self.job_name = "sshpyk-" + str(self.kid)[:8]
        self.node = None
        self.host = None
        self.slurm_state = "SUBMITTING"
        self.reason = ""
        self.submitted = time.monotonic()
        self.running_since = None
        self.node_error = None
        self.finished = threading.Event()
        self.stdout_done = threading.Event()
        self.stdin_queue = queue.Queue()
        self.cleanup_lock = threading.Lock()
        self.cleaned_up = False
        #: the authenticated connection to the node side, once up (see "the relay")
        self.mux = None
        self.relay_secret = os.urandom(32)
        self.node_ready = False  # the node side says the kernel's sockets are bound
        #: where the five relay sockets are (the run dir, or a shorter one if it is long)
        self.socket_dir = None
        self.listeners = []
        self.listeners_lock = threading.Lock()

    def state(self):
        state = Kernel.state(self)
        state.update(
            launcher="slurm",
            host=self.host,
            job_id=self.job_id,
            node=self.node,
            slurm_state=self.slurm_state,
            slurm_reason=self.reason,
        )
        return state

    def connection_info(self):
        """The kernel as seen from here: an ipc kernel on the relay sockets (the node's
        own connection file stays on the node); the key is the launch request's."""
        request = self.request
        if self.running_since is None:
            raise BootstrapError("not_found", "kernel %s has not started yet" % self.kid)
        info = {
            "transport": "ipc",
            "ip": os.path.join(self.socket_dir, "k"),
            "key": request["key"],
            "signature_scheme": request.get("signature_scheme", "hmac-sha256"),
            "kernel_name": request["kernel_name"],
        }
        for n, channel in enumerate(CHANNELS, start=1):
            info[channel + "_port"] = n
        return info

    def launch(self):
        request = self.request
        core, slurm_source = globals().get("SSHPYK_SOURCE"), globals().get("SSHPYK_SLURM")
        if not core or not slurm_source:
            raise BootstrapError("launch_failed", "the agent does not have its own source")
        if not isinstance(slurm_source, bytes):
            slurm_source = slurm_source.encode("utf-8")
        spec = find_kernelspec(request["kernel_name"])
        srun = shutil.which("srun")
        if srun is None:
            slurm_command(["srun"])  # raises the clear "not found" error
        cwd = os.path.expanduser(request.get("cwd") or "~")
        if not os.path.isdir(cwd):
            raise BootstrapError(
                "launch_failed", "remote working directory %r does not exist" % cwd
            )
        self.run_dir = private_run_dir(self.agent.run_root, self.kid)
        self.log_path = os.path.join(self.run_dir, "srun.log")
        # Seen from here the kernel is an ipc kernel: five unix sockets, bound once the
        # node is ready, relayed to the node side (see "the relay"; the run dir is 0700).
        self.transport = "ipc"
        self.socket_dir = self.run_dir
        if len(os.path.join(self.socket_dir, "k")) > MAX_IPC_PREFIX:
            self.socket_dir = private_run_dir(None, self.kid)  # a long --remote-run-root
            if len(os.path.join(self.socket_dir, "k")) > MAX_IPC_PREFIX:
                raise BootstrapError(
                    "launch_failed",
                    "no directory short enough for unix sockets (%s)" % self.socket_dir,
                )
        self.endpoints = dict(
            (channel, os.path.join(self.socket_dir, "k-%d" % n))
            for n, channel in enumerate(CHANNELS, start=1)
        )
        argv = kernel_argv(spec, "{connection_file}")
        env = dict(spec.get("env") or {})
        env.update(request.get("env") or {})
        command = (
            [srun, "--job-name=" + self.job_name]
            + [str(a) for a in request.get("slurm_args") or []]
            + ["--ntasks=1", sys.executable, "-c", NODE_LOADER % (len(core), len(slurm_source))]
        )
        node_request = {
            "v": PROTOCOL,
            "op": "node",
            "kid": self.kid,
            "key": request["key"],
            "signature_scheme": request.get("signature_scheme", "hmac-sha256"),
            "kernel_name": request["kernel_name"],
            "argv": argv,
            "env": env,
            "cwd": request.get("cwd"),
            "run_root": self.agent.run_root,
            "transport": request.get("transport") or "auto",
            "relay_secret": self.relay_secret.hex(),
        }
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise BootstrapError("launch_failed", "cannot start %s: %s" % (srun, exc)) from None
        self.submitted = time.monotonic()
        self.stdin_queue.put(
            core + slurm_source + (json.dumps(node_request) + "\n").encode("utf-8")
        )
        self.describe(
            argv,
            launcher="slurm",
            job_name=self.job_name,
            slurm_args=request.get("slurm_args") or [],
            socket_dir=self.socket_dir if self.socket_dir != self.run_dir else None,
        )
        for target in (self._write_stdin, self._read_stdout, self._read_stderr, self._wait):
            threading.Thread(target=target, daemon=True).start()
        emit(
            "started",
            kid=self.kid,
            pid=self.proc.pid,
            pgid=self.proc.pid,
            run_dir=self.run_dir,
            transport=self.transport,
            endpoints={},
            argv=argv,
            resource_dir=spec.get("resource_dir"),
            language=spec.get("language"),
            launcher="slurm",
            job_name=self.job_name,
        )
        # after "started": the local side learns of the kernel before its queue events
        threading.Thread(target=self._monitor, daemon=True).start()

    def write_info(self):
        """sshpyk.json on the login node, with where the job runs."""
        self.info.update(job_id=self.job_id, node=self.node, host=self.host)
        super().write_info()

    # -- srun's stdio (threads) ------------------------------------------------------
    def send(self, message):
        """A request to the node, as a JSON line on srun's stdin."""
        self.stdin_queue.put((json.dumps(message) + "\n").encode("utf-8"))

    def _on_json(self, event):
        self.agent.events.put(("node", (self.kid, event)))

    def _write_stdin(self):
        stdin = self.proc.stdin
        while True:
            data = self.stdin_queue.get()
            if data is None:
                break
            try:
                stdin.write(data)
                stdin.flush()
            except (OSError, ValueError):
                break
        try:
            stdin.close()
        except (OSError, ValueError):
            pass

    def _read_stdout(self):
        """The node's JSON events, until srun's stdout ends."""
        stdout = self.proc.stdout
        try:
            for line in iter(stdout.readline, b""):  # ends at EOF
                try:
                    event = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._on_json(event)
        except (OSError, ValueError):
            pass
        finally:
            self.stdout_done.set()

    # -- the relay (threads) -------------------------------------------------------------
    def _connect_relay(self, host, port):
        """Connect and authenticate the node's relay connection (see "the relay"), then
        serve it until it ends: then every relayed connection is closed and the relay
        sockets stop accepting."""
        try:
            sock = relay_connect(host, port, self.relay_secret)
        except (OSError, ValueError) as exc:
            self.node_error = (
                "launch_failed",
                "cannot reach the node side of the kernel at %s:%s from the login node: %s"
                % (host, port, exc),
            )
            self.agent.events.put(("node", (self.kid, {"event": "relay_failed"})))
            return
        with self.cleanup_lock:
            if self.cleaned_up:
                sock.close()
                return
            self.mux = Mux(sock)
        self.agent.events.put(("node", (self.kid, {"event": "relay_up"})))
        try:
            self.mux.serve()
        finally:
            self.close_listeners()

    # -- the relay sockets here (threads) ----------------------------------------------------
    def listen(self):
        """Bind the five relay sockets (when the node is ready); False if impossible."""
        with self.listeners_lock:
            if self.listeners or self.mux is None or self.mux.closed:
                return bool(self.listeners)
            try:
                for channel in CHANNELS:
                    path = self.endpoints[channel]
                    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.listeners.append(listener)
                    listener.bind(path)
                    listener.listen(64)
                    listener.settimeout(_RELAY_TICK)
            except OSError as exc:
                self.node_error = ("launch_failed", "cannot listen on %s: %s" % (path, exc))
                for listener in self.listeners:
                    listener.close()
                self.listeners = []
                return False
            for channel, listener in zip(CHANNELS, self.listeners):
                threading.Thread(target=self._accept, args=(listener, channel), daemon=True).start()
        return True

    def _accept(self, listener, channel):
        mux = self.mux
        while not mux.closed:  # ends when the relay closes (checked every tick)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # closed
            conn.settimeout(None)
            mux.open_stream(conn, channel)

    def close_listeners(self):
        with self.listeners_lock:
            listeners, self.listeners = self.listeners, []
        for listener in listeners:
            try:
                listener.close()
            except OSError:
                pass

    def _read_stderr(self):
        try:
            with open(self.log_path, "ab") as log:
                for line in iter(self.proc.stderr.readline, b""):
                    log.write(line)
                    log.flush()
                    match = _SRUN_JOB_RE.search(line.decode("utf-8", "replace"))
                    if match and self.job_id is None:
                        self.job_id = match.group(1)
                        self.write_info()
        except (OSError, ValueError):
            pass

    def _wait(self):
        self.stdout_done.wait()  # the node's last events are queued before srun's exit
        code = self.proc.wait()
        self.agent.events.put(("exit", (self.kid, code)))

    # -- the queue, the time limit (a thread) ------------------------------------------
    def _poll_job(self):
        if self.job_id is None and time.monotonic() - self.submitted > SLURM_POLL:
            found = slurm_job_by_name(self.job_name)  # srun did not say (e.g. --quiet)
            if found and self.job_id is None:
                self.job_id = found
                self.write_info()
        if self.job_id is None:
            return None
        return squeue_jobs([self.job_id]).get(str(self.job_id))

    def _monitor(self):
        request = self.request
        interval = max(1.0, float(request.get("slurm_status_interval") or 30.0))
        queue_timeout = float(request.get("slurm_queue_timeout") or 600.0)
        lead = float(request.get("slurm_walltime_warning") or 0.0)
        reported_at, reported = None, None
        while not self.finished.is_set() and self.running_since is None:
            try:
                job = self._poll_job()
            except BootstrapError:
                job = None
            waited = time.monotonic() - self.submitted
            if self.running_since is not None:
                break
            if job is not None:
                self.slurm_state, self.reason = job["state"], job["reason"]
                now = time.monotonic()
                if (job["state"], job["reason"]) != reported or now - reported_at >= interval:
                    reported, reported_at = (job["state"], job["reason"]), now
                    emit(
                        "slurm",
                        kid=self.kid,
                        job_id=self.job_id,
                        state=job["state"],
                        reason=job["reason"],
                        waited=round(waited, 1),
                    )
            if waited >= queue_timeout:
                if self.job_id:
                    what = "SLURM job %s was still %s after %gs%s" % (
                        self.job_id,
                        (self.slurm_state or "pending").lower(),
                        queue_timeout,
                        " (reason: %s)" % self.reason if self.reason else "",
                    )
                else:
                    what = "the SLURM job was not started within %gs" % queue_timeout
                # the local side appends " on '<alias>'"
                what += ", so it was cancelled: raise --slurm-queue-timeout, or see `sinfo`"
                self.agent.events.put(("fail", (self.kid, "slurm_queue_timeout", what)))
                return
            self.finished.wait(min(SLURM_POLL, max(0.05, queue_timeout - waited)))
        # running: warn once, `lead` seconds ahead of the time limit
        while lead > 0 and not self.finished.is_set():
            try:
                job = self._poll_job()
            except BootstrapError:
                job = None
            if job is None or job["time_left"] is None:
                return  # no time limit, or SLURM cannot tell
            due = job["time_left"] - lead
            if due > 0:
                self.finished.wait(min(due, 600.0))  # then ask again: limits can change
                continue
            emit(
                "slurm",
                kid=self.kid,
                job_id=self.job_id,
                state=job["state"],
                node=self.node,
                time_left=job["time_left"],
                warning="walltime",
            )
            return

    # -- events from the node (on the agent's loop) --------------------------------------
    def on_node_event(self, event):
        kind = event.get("event")
        if kind == "node":
            self.running_since = time.monotonic()
            self.job_id = str(event.get("job_id") or self.job_id or "") or None
            self.node = event.get("node")
            self.host = event.get("host")  # the node side's relay listener
            self.slurm_state, self.reason = "RUNNING", ""
            self.write_info()
            emit(
                "slurm",
                kid=self.kid,
                job_id=self.job_id,
                state="RUNNING",
                node=self.node,
                host=self.host,
                transport=self.transport,
                endpoints=self.endpoints,
                node_pid=event.get("pid"),
                node_transport=event.get("transport"),
                waited=round(self.running_since - self.submitted, 3),
            )
            port = event.get("relay_port")
            if port and not self.cleaned_up:
                threading.Thread(
                    target=self._connect_relay,
                    args=(event.get("host"), port),
                    daemon=True,
                ).start()
        elif kind in ("ready", "relay_up"):
            # the node probed the kernel's sockets and the relay is up (both, in either
            # order): bind ours, then tell the local side
            if kind == "ready":
                self.node_ready = True
            if self.node_ready and self.mux is not None and not self.ready:
                if self.exit_code is None and self.listen():
                    self.ready = True
                    emit("ready", kid=self.kid)
                else:
                    threading.Thread(target=self.cleanup, daemon=True).start()
        elif kind == "relay_failed":
            threading.Thread(target=self.cleanup, daemon=True).start()
        elif kind == "exited":
            if self.exit_code is None:
                self.on_exit(int(event.get("code", -1)), str(event.get("stderr_tail") or ""))
        elif kind == "error":
            self.node_error = (str(event.get("kind") or "launch_failed"), event.get("message"))

    def on_exit(self, code, stderr_tail=None):
        self.exit_code = code
        self.finished.set()
        if stderr_tail is None:
            stderr_tail = tail(self.log_path)  # srun's stderr: why the job did not run
        if self.ready:
            emit("exited", kid=self.kid, code=code, stderr_tail=stderr_tail)
        else:
            if self.node_error is not None:
                kind, message = self.node_error
            elif self.running_since is None:
                kind = "slurm_failed"
                message = "the SLURM job%s ended before the kernel ran (srun exit code %s)" % (
                    " " + self.job_id if self.job_id else "",
                    code,
                )
            else:
                kind = "kernel_exited"
                message = "the kernel exited with code %s during start (SLURM job %s on %s)" % (
                    code,
                    self.job_id,
                    self.node,
                )
            emit(
                "error",
                kid=self.kid,
                kind=kind,
                message=message,
                code=code,
                stderr_tail=stderr_tail,
            )
        # the job ends with srun; reap what is left off the loop (scancel may be slow)
        threading.Thread(target=self.cleanup, daemon=True).start()

    def signal(self, signum):
        if self.exit_code is not None or self.proc is None:
            return
        if self.running_since is not None:
            self.send({"op": "signal", "signum": int(signum)})
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            # not running yet: give up the queued job, off the loop (scancel may be slow)
            threading.Thread(target=self.cleanup, daemon=True).start()

    def cleanup(self):
        """Stop the kernel on the node, end the job (scancel), remove the run dir.
        Idempotent and thread safe: a second caller waits for the first."""
        with self.cleanup_lock:
            if self.cleaned_up:
                return
            self.cleaned_up = True
            self.finished.set()
            proc = self.proc
            if proc is not None:
                if proc.poll() is None and self.running_since is not None:
                    self.send({"op": "stop"})  # the node side TERMs, then KILLs the kernel
                    self.stdin_queue.put(None)
                    wait_exit(proc, TERM_WAIT + 5)
                for signum, seconds in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
                    if proc.poll() is None:
                        # srun cancels its step (or revokes a pending allocation)
                        try:
                            os.killpg(proc.pid, signum)
                        except (ProcessLookupError, PermissionError):
                            pass
                        wait_exit(proc, seconds)
                self.stdin_queue.put(None)
            if self.mux is not None:
                self.mux.shutdown()
            self.close_listeners()
            try:
                if self.job_id is None and proc is not None:
                    self.job_id = slurm_job_by_name(self.job_name)
                if self.job_id is not None:
                    scancel(self.job_id)  # belt and braces: no job outlives its kernel
            except BootstrapError:
                pass
            if self.socket_dir and self.socket_dir != self.run_dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            if self.run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                self.run_dir = None


def wait_exit(proc, seconds):
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


# -- SLURM: the compute node side -------------------------------------------------------


def node_address():
    """This node's address as the login node reaches it: the local end of the route to
    the host srun runs on (connecting a UDP socket sends nothing), else the address of
    the node's name."""
    launch = os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "")
    if launch and ":" not in launch:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((launch, 9))
            return probe.getsockname()[0]
        except OSError:
            pass
        finally:
            probe.close()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def run_node(request):
    """Node mode, inside the SLURM job step: start one kernel on private sockets, report
    on stdout, obey stdin (``signal``, ``stop``; EOF means the agent or srun is gone),
    and relay the login node's connections to the kernel (see "the relay"). Always
    stops the kernel's process group and removes the run dir on the way out."""
    # The kernel inherits ignored signals but not handlers: ignore SIGINT (a
    # `scancel --signal=INT` reaches every process of the step) through a handler.
    signal.signal(signal.SIGINT, lambda *_: None)
    events = queue.Queue()
    run_dir = private_run_dir(request.get("run_root"), request["kid"])
    proc = None
    mux = None
    listener = None
    try:
        # ipc in the 0700 run dir if the kernel supports it (and the path fits), else tcp
        # on 127.0.0.1: never an address other hosts reach
        transport = pick_transport(
            request.get("transport") or "auto", {"argv": request["argv"]}, run_dir
        )
        conn_file, endpoints = write_connection_file(run_dir, transport, request, "127.0.0.1")
        argv = [str(a).replace("{connection_file}", conn_file) for a in request["argv"]]
        proc, log_path = spawn_kernel(
            argv,
            request.get("env") or {},
            request["kid"],
            run_dir,
            request.get("cwd"),
            " on the node",
        )

        def connect(channel):
            target = endpoints[channel]
            if transport == "ipc":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address = target
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                address = ("127.0.0.1", target)
            try:
                sock.settimeout(10.0)
                sock.connect(address)
                sock.settimeout(None)
            except OSError:
                sock.close()
                raise
            return sock

        # the relay's listener: on the address the login node reaches, for one
        # authenticated connection (see "the relay"), closed once it is made
        secret = bytes.fromhex(str(request.get("relay_secret") or ""))
        if len(secret) < 16:
            raise BootstrapError("launch_failed", "the node request has no relay secret")
        host = node_address()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(8)
        except OSError:
            listener.close()
            raise
        emit(
            "node",
            pid=proc.pid,
            host=host,
            relay_port=listener.getsockname()[1],
            transport=transport,
            run_dir=run_dir,
            node=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
            job_id=os.environ.get("SLURM_JOB_ID"),
            step_id=os.environ.get("SLURM_STEP_ID"),
        )

        def accept_relay():
            conn = relay_accept(listener, secret, time.monotonic() + RELAY_CONNECT_TIMEOUT)
            events.put(("relay", conn))

        def serve_relay(the_mux):
            the_mux.serve()
            events.put(("eof", None))  # the login side is gone (or stopping us)

        def read_stdin():
            for line in iter(sys.stdin.buffer.readline, b""):  # ends at srun's EOF
                try:
                    msg = json.loads(line.decode("utf-8"))
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    events.put(("msg", msg))
            events.put(("eof", None))

        def wait_kernel():
            events.put(("exit", proc.wait()))

        for target in (accept_relay, read_stdin, wait_kernel):
            threading.Thread(target=target, daemon=True).start()
        ready = False
        bound = set()  # sockets seen accepting, see endpoints_bound
        while True:  # ends with the kernel, a stop request, or srun's stdin
            try:
                kind, value = events.get(timeout=1.0 if ready else 0.01)
            except queue.Empty:
                kind, value = None, None
            if kind == "exit":
                emit("exited", code=value, stderr_tail=tail(log_path))
                return 0
            if kind == "eof" or (kind == "msg" and value.get("op") == "stop"):
                return 0
            if kind == "relay":
                if value is None:
                    emit(
                        "error",
                        kind="launch_failed",
                        message="the login node did not connect to the node side of the "
                        "kernel (on %s) within %gs: does a firewall stand between them?"
                        % (host, RELAY_CONNECT_TIMEOUT),
                    )
                    return 1
                mux = Mux(value, connect)
                threading.Thread(target=serve_relay, args=(mux,), daemon=True).start()
            if kind == "msg" and value.get("op") == "signal":
                try:
                    os.killpg(proc.pid, int(value["signum"]))
                except (ProcessLookupError, PermissionError, KeyError, ValueError):
                    pass
            if (
                not ready
                and mux is not None
                and endpoints_bound(transport, endpoints, "127.0.0.1", bound)
            ):
                ready = True
                emit("ready")
    finally:
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept_relay, which closes it
            except OSError:
                pass
        if mux is not None:
            mux.shutdown()
        if proc is not None:
            stop_group(proc)
        shutil.rmtree(run_dir, ignore_errors=True)


def stop_group(proc):
    """TERM the process group, KILL it after TERM_WAIT seconds."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + TERM_WAIT
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children it left behind in its group
    except (ProcessLookupError, PermissionError):
        pass
    wait_exit(proc, 2.0)


def terminate_kernel_job(info):
    """For `sshpyk kill`: SIGTERM to the processes of a SLURM kernel's job, then wait
    (bounded) for its srun to exit. Not to srun, which would SIGKILL the step at once:
    the node side handles SIGTERM by stopping the kernel and removing its run dir."""
    job_id = info.get("job_id")
    pid = int(info.get("pid") or 0)
    if not job_id or pid <= 1:
        return
    try:
        slurm_command(["scancel", "--signal=TERM", str(job_id)])
    except BootstrapError:
        return
    deadline = time.monotonic() + TERM_WAIT + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def cancel_kernel_job(info):
    """For `sshpyk kill`: scancel the job of a SLURM kernel found by ``scan_kernels``,
    and remove its relay sockets' directory if they were not in its run dir."""
    socket_dir = info.get("socket_dir")
    if socket_dir and os.path.basename(str(socket_dir)).startswith("sshpyk-"):
        shutil.rmtree(str(socket_dir), ignore_errors=True)
    try:
        job_id = info.get("job_id")
        if not job_id and info.get("job_name"):
            job_id = slurm_job_by_name(str(info["job_name"]))
        if job_id:
            scancel(job_id)
    except BootstrapError:
        pass
