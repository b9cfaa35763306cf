"""Idle kernels: what a kernel did last (seen in its relay), ``ps``'s ``idle_s``, and
the idle timeout (the launch request's ``idle_timeout``, seconds; 0 or none: off).

Activity is what a user causes: an ``execute_request`` on shell (client -> kernel), and
on iopub (kernel -> client) output (stream, display_data, update_display_data,
execute_input, execute_result, error, clear_output) and the busy/idle status of any
request but the ones clients send by themselves (:data:`PASSIVE`: kernel_info,
comm_info, jupyter-resource-usage's usage_request, shutdown). Between the busy and the
idle of a request (by its msg_id, the status's parent: several iopub streams may
deliver them in any order between them) a kernel is busy, never idle, however long its
cell runs.

Where it is seen: the relay (links.py) hands this module the bytes of each shell
stream from the local side and of each iopub stream from the kernel, as they pass; a
:class:`Sniffer` per stream follows the ZMTP 3 framing and copies only the JSON header
of a message (and, for a status, its parent header and content), never a payload.
It runs on the event loop: a few attribute updates per message. An iopub stream it
cannot follow makes the kernel's activity unknown: its idle timeout no longer applies
(logged). A kernel without a
relay (``outage_buffer`` 0, or a run dir too long for a unix socket: its channels are
SSH channels from sshd straight to the kernel's sockets) is not seen: its ``idle_s``
is null and the idle timeout does not apply to it (the agent says so at launch). Nor
is what reaches the kernel's sockets from the remote host itself (its run dir is 0700:
only this user). A kernel whose iopub nobody relays any more (its local sides gone for
longer than the link grace) keeps the state last seen: busy stays busy, so a kernel that
may still compute is never shut down; idle counts on.

The agent's loop calls :meth:`IdleWatch.tick`: at most every :data:`TICK` seconds it
writes each kernel's last activity as the mtime of ``activity`` in its run dir (what
``ps`` reads, for kernels of any agent: :func:`idle_seconds`) and shuts down the
kernels idle for their timeout: out of the agent's kernels at once, then in a worker
(if still idle then: else the loop takes it back) a ``shutdown_request`` on the
kernel's control channel (signed with its key), up to
:data:`POLITE_WAIT` seconds for it to exit, and the launcher's cleanup (TERM, KILL
of its group, as a ``stop``). The local side gets ``exited`` with ``reason``
``idle_timeout`` (protocol.IDLE_TIMEOUT) and ``idle_s``, whatever failed (then logged,
and ``code`` -1 if the cleanup failed); the line goes to the agent's
stderr and ``agent.log`` in its agent dir too.
"""

import hashlib
import hmac
import json
import os
import re
import socket
import sys
import time
import uuid
from collections import OrderedDict

from .protocol import IDLE_TIMEOUT, Event
from .zmtp import ZMTP_AHEAD

#: seconds between two looks at the kernels (and writes of their ``activity`` mtime)
TICK = 1.0
#: seconds a kernel has to exit after its shutdown_request, before its group is stopped
POLITE_WAIT = 5.0
#: seconds for the whole shutdown_request exchange on the control channel
CONTROL_TIMEOUT = 3.0
#: iopub messages that are output (activity)
OUTPUT_TYPES = frozenset(
    (
        "stream",
        "display_data",
        "update_display_data",
        "execute_input",
        "execute_result",
        "error",
        "clear_output",
    )
)
#: requests a client sends by itself (at connect, or polling): their busy/idle is not
#: activity
PASSIVE = frozenset(
    ("kernel_info_request", "comm_info_request", "usage_request", "shutdown_request")
)
#: requests remembered as running (busy, no idle yet) and as finished (their idle seen:
#: a late busy, from a stream that lags behind another, is ignored); beyond it the
#: oldest is dropped (a running one is then logged: a cell can run for days)
REMEMBERED = 1000
#: the exit code told when the shutdown or cleanup failed (the process may still run)
LOST = -1
#: the longest header (parent header, status content) a sniffer copies; longer: skipped
CAPTURE = 8192
ACTIVITY_FILE = "activity"
DELIMITER = b"<IDS|MSG>"
_MSG_TYPE = re.compile(rb'"msg_type"\s*:\s*"([A-Za-z_]{1,64})"')
_STATE = re.compile(rb'"execution_state"\s*:\s*"([a-z]{1,16})"')
_MSG_ID = re.compile(rb'"msg_id"\s*:\s*"([^"\\]{0,256})"')
# after the delimiter: 1 signature, 2 header, 3 parent header, 4 metadata, 5 content
_HEADER, _PARENT, _CONTENT = 2, 3, 5


def msg_type(header):
    """The msg_type of a message's JSON header (bytes), or ""."""
    found = _MSG_TYPE.search(header) if header else None
    return found.group(1).decode("ascii") if found else ""


class Sniffer:
    """Follows what one side of a ZMQ connection sends (ZMTP 3: a 64-byte greeting,
    then frames: flags, a 1- or 8-byte size, the body) and calls
    ``on_message(header, parent, content)`` for each message with a Jupyter header
    (bytes; parent and content only for a status, else None). Frame bodies it does not
    need are skipped as they pass, not copied. Anything that is not ZMTP 3 (or breaks
    this parser) makes it stop looking (``dead``; ``on_dead()`` is called once): the
    relay never depends on it."""

    __slots__ = (
        "on_message",
        "on_dead",
        "greeting",
        "head",
        "body",
        "keep",
        "command",
        "more",
        "index",
        "kind",
        "parts",
        "dead",
    )

    def __init__(self, on_message, on_dead=None, ahead=False):
        self.on_message = on_message
        self.on_dead = on_dead
        #: bytes of the greeting still to come (``ahead``: its first 11 were dropped)
        self.greeting = 64 - len(ZMTP_AHEAD) if ahead else 64
        self.head = b""  # the current frame's header, while incomplete
        self.body = 0  # bytes of the current frame's body still to come
        self.keep = None  # a bytearray: the current body is copied (a header)
        self.command = False
        self.more = False
        self.index = -1  # frames since the delimiter (-1: not seen in this message)
        self.kind = ""  # the current message's msg_type, once its header is read
        self.parts = {}
        self.dead = False

    def feed(self, data):
        if self.dead:
            return
        try:
            self._feed(data)
        except Exception:  # whatever it is, the relay must not see it: stop looking
            self.dead = True
        if self.dead and self.on_dead is not None:
            on_dead, self.on_dead = self.on_dead, None
            try:
                on_dead()
            except Exception:
                pass

    def _feed(self, data):
        n = len(data)
        i = 0
        if self.greeting:
            if self.greeting == 64 and n and data[0] != 0xFF:
                self.dead = True  # not ZMTP 3 (the greeting's signature)
                return
            i = min(self.greeting, n)
            self.greeting -= i
        while i < n:  # ends when every byte of data is consumed (each pass takes some)
            if self.body:
                take = min(self.body, n - i)
                if self.keep is not None:
                    self.keep += data[i : i + take]
                i += take
                self.body -= take
                if not self.body:
                    self._frame_done()
                continue
            head = self.head
            want = 9 if (head[0] if head else data[i]) & 0x02 else 2
            take = min(want - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) < want:
                self.head = head
                continue
            self.head = b""
            self._frame_start(head[0], int.from_bytes(head[1:], "big"))

    def _frame_start(self, flags, size):
        self.command = bool(flags & 0x04)
        self.more = bool(flags & 0x01) and not self.command
        self.body = size
        self.keep = None
        if not self.command:
            index = self.index + 1 if self.index >= 0 else -1
            if index < 0:
                wanted = size == len(DELIMITER)
            elif index in (_PARENT, _CONTENT):
                wanted = self.kind == "status"
            else:
                wanted = index == _HEADER
            if wanted and size <= CAPTURE:
                self.keep = bytearray()
        if not size:
            self._frame_done()

    def _frame_done(self):
        if self.command:
            return  # commands come between messages
        keep, self.keep = self.keep, None
        if self.index < 0:
            if keep is not None and keep == DELIMITER:
                self.index = 0
        else:
            self.index += 1
            if keep is not None:
                self.parts[self.index] = bytes(keep)
                if self.index == _HEADER:
                    self.kind = msg_type(keep)
        if not self.more:  # the message's last frame
            parts, self.parts = self.parts, {}
            header = parts.get(_HEADER)
            self.index, self.kind = -1, ""
            if header is not None:
                self.on_message(header, parts.get(_PARENT), parts.get(_CONTENT))


class Activity:
    """A kernel's last activity (wall time) and whether it is busy (some request's
    busy seen, its idle not yet: several iopub streams, e.g. Jupyter Server's one per
    websocket and its activity watcher, may deliver them in any order between them).

    Written on the relay's event loop (the only writer of ``state``, one tuple
    assigned at once), read by the agent's loop: :meth:`seen`. The agent's loop sets
    ``last`` (``floor``: a spare adopted) and never ``state``. ``blind``: an iopub
    stream could not be followed, its activity is unknown (never idle for the reaper);
    ``forgotten``: running requests dropped beyond :data:`REMEMBERED`."""

    def __init__(self, now=None):
        now = time.time() if now is None else now
        self.state = (now, False)  # (last, busy)
        self.floor = now
        self.running = OrderedDict()  # parent msg_id -> None, busy seen, idle not yet
        self.finished = OrderedDict()  # parent msg_id -> None, idle seen
        self.blind = False
        self.forgotten = 0

    @property
    def last(self):
        return max(self.state[0], self.floor)

    @last.setter
    def last(self, value):
        self.floor = value  # counts as activity at ``value`` (from the agent's loop)

    @property
    def busy(self):
        return self.state[1]

    def seen(self):
        """(last, busy), as one write left them."""
        last, busy = self.state
        return max(last, self.floor), busy

    def sniffer(self, channel, ahead=False):
        """A Sniffer for a stream of ``channel``, or None if it is not watched: for
        shell what the local side sends, for iopub what the kernel sends. ``ahead``:
        the stream lacks ZMTP's first bytes (zmtp.py)."""
        if channel == "shell":
            return Sniffer(self.on_request, ahead=ahead)
        if channel == "iopub":
            return Sniffer(self.on_output, self.on_blind, ahead=ahead)
        return None

    def on_blind(self):
        self.blind = True

    def on_request(self, header, parent, content):
        if msg_type(header) == "execute_request":
            self.state = (time.time(), bool(self.running))

    def on_output(self, header, parent, content):
        kind = msg_type(header)
        if kind in OUTPUT_TYPES:
            self.state = (time.time(), bool(self.running))
        elif kind == "status" and msg_type(parent) not in PASSIVE:
            found = _STATE.search(content) if content else None
            state = found.group(1) if found else b""
            found = _MSG_ID.search(parent) if parent else None
            request = found.group(1) if found else b""
            if state == b"busy":
                if request not in self.finished:  # else a late one (a lagging stream)
                    self.running[request] = None
                    self.running.move_to_end(request)
                    if len(self.running) > REMEMBERED:
                        self.running.popitem(last=False)
                        self.forgotten += 1
            elif state == b"idle":
                self.running.pop(request, None)
                self.finished[request] = None
                self.finished.move_to_end(request)
                if len(self.finished) > REMEMBERED:
                    self.finished.popitem(last=False)
            else:
                return
            self.state = (time.time(), bool(self.running))  # last and busy at once

    def idle_for(self, now):
        """Seconds idle at ``now`` (wall time): 0 while busy."""
        last, busy = self.seen()
        return 0.0 if busy else max(0.0, now - last)


def idle_seconds(run_dir, now=None):
    """``ps``'s ``idle_s`` of the kernel in ``run_dir``: seconds since its last activity
    (from its ``activity`` file), None if unknown (no relay, an older agent)."""
    try:
        last = os.lstat(os.path.join(run_dir, ACTIVITY_FILE)).st_mtime
    except OSError:
        return None
    return round(max(0.0, (time.time() if now is None else now) - last), 1)


def create_activity_file(run_dir):
    """The ``activity`` file of a kernel whose relay (so its Activity) started now."""
    try:
        fd = os.open(os.path.join(run_dir, ACTIVITY_FILE), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    except OSError:
        pass  # ps then says unknown; the timeout still works


def idle_timeout(request):
    """The request's idle timeout in seconds, 0.0 if off (or not a number)."""
    try:
        return max(0.0, float(request.get("idle_timeout") or 0))
    except (TypeError, ValueError):
        return 0.0


def should_reap(kernel, now):
    """Seconds ``kernel`` (a launcher) has been idle if that reaches its idle timeout,
    else None. Not a spare, not before it is ready, not once it exited, not while its
    activity is unknown (``blind``)."""
    timeout = idle_timeout(kernel.request)
    activity = getattr(kernel, "activity", None)
    if (
        not timeout
        or activity is None
        or activity.blind
        or not kernel.ready
        or kernel.exit_code is not None
        or kernel.request.get("spare")
    ):
        return None
    idle = activity.idle_for(now)
    return idle if idle >= timeout else None


# -- the shutdown_request, in a worker ------------------------------------------------
def _frame(body, more):
    if len(body) < 256:
        return bytes((0x01 if more else 0x00, len(body))) + body
    return bytes((0x03 if more else 0x02,)) + len(body).to_bytes(8, "big") + body


def _recv_exactly(sock, count, deadline):
    data = b""
    while len(data) < count:  # ends at count bytes, EOF or the deadline
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError("the kernel's control channel did not answer in time")
        sock.settimeout(left)
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise OSError("the kernel closed its control channel")
        data += chunk
    return data


def _recv_frame(sock, deadline):
    flags = _recv_exactly(sock, 1, deadline)[0]
    size = int.from_bytes(_recv_exactly(sock, 8 if flags & 0x02 else 1, deadline), "big")
    if size > CAPTURE:
        raise OSError("an unexpected frame of %d bytes on the control channel" % size)
    return flags, _recv_exactly(sock, size, deadline)


def shutdown_message(key, scheme):
    """The frames of a signed shutdown_request (a DEALER's: no identities)."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "session": uuid.uuid4().hex,
        "username": "sshpyk-agent",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "msg_type": "shutdown_request",
        "version": "5.3",
    }
    parts = [json.dumps(p).encode() for p in (header, {}, {}, {"restart": False})]
    signature = b""
    if key:
        digest = (scheme or "hmac-sha256").split("-", 1)[-1]
        mac = hmac.new(key.encode(), digestmod=getattr(hashlib, digest))
        for part in parts:
            mac.update(part)
        signature = mac.hexdigest().encode()
    return [DELIMITER, signature] + parts


def send_shutdown(target, key, scheme, timeout=CONTROL_TIMEOUT):
    """Send a shutdown_request to the control channel at ``target`` (a unix socket
    path or a port on 127.0.0.1) as a ZMQ DEALER (ZMTP 3.0, NULL security) and wait
    for the reply, at most ``timeout`` seconds in all. OSError if it fails."""
    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        sock.connect(target if isinstance(target, str) else ("127.0.0.1", int(target)))
        greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
        sock.sendall(greeting + b"\x00" * 32)
        _recv_exactly(sock, 64, deadline)
        ready = b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"
        sock.sendall(bytes((0x04, len(ready))) + ready)
        for _ in range(4):  # the peer's READY (and nothing else before it, bounded)
            flags, body = _recv_frame(sock, deadline)
            if flags & 0x04 and body.startswith(b"\x05READY"):
                break
        frames = shutdown_message(key, scheme)
        sock.sendall(b"".join(_frame(f, i < len(frames) - 1) for i, f in enumerate(frames)))
        _recv_frame(sock, deadline)  # the reply's first frame: the kernel took it
    finally:
        sock.close()


def _failed(log, kernel, what, exc):
    log("kernel %s: %s (%s: %s)" % (kernel.kid, what, type(exc).__name__, exc))


def shut_down(kernel, log, still_idle=None):
    """In a worker: the polite shutdown of an idle ``kernel``, then its cleanup. Returns
    its exit code (-15: its group was stopped; :data:`LOST`: the cleanup failed, the
    process may still run), or None, untouched, if ``still_idle()`` says no just before
    the shutdown_request. Raises nothing: a failure is a line of ``log``."""
    try:
        if still_idle is not None and not still_idle():
            return None
    except Exception as exc:
        _failed(log, kernel, "the idle check failed", exc)
    code = None
    try:
        target = kernel.endpoints.get("control") if kernel.endpoints else None
        request = kernel.request
        if isinstance(target, (str, int)):
            try:
                key = str(request.get("key") or "")
                send_shutdown(target, key, request.get("signature_scheme"))
            except Exception as exc:  # the group is stopped below
                _failed(log, kernel, "its shutdown_request failed", exc)
        deadline = time.monotonic() + POLITE_WAIT
        while code is None and time.monotonic() < deadline:  # bounded: POLITE_WAIT
            code = kernel.poll_exit()
            if code is None:
                time.sleep(0.05)
    except Exception as exc:
        _failed(log, kernel, "waiting for its exit failed", exc)
    try:
        kernel.cleanup()
        code = code if code is not None else -15
    except Exception as exc:
        _failed(log, kernel, "its cleanup failed", exc)
        code = code if code is not None else LOST
    finally:
        kernel.exit_code = LOST if code is None else code
    return kernel.exit_code


class IdleWatch:
    """The agent's look at its kernels' activity (see the module doc)."""

    def __init__(self, agent):
        self.agent = agent
        self.next = 0.0
        self.written = {}  # kid -> the mtime last written to its activity file
        self.told = {}  # kid -> (blind, forgotten) last logged

    def tick(self, now):
        """From the agent's loop (``now``: monotonic); returns at once between ticks."""
        if now < self.next:
            return
        self.next = now + TICK
        wall = time.time()
        for kernel in list(self.agent.kernels.values()):
            activity = getattr(kernel, "activity", None)
            if activity is None or not kernel.run_dir:
                continue
            self.note(kernel, activity)
            last, busy = activity.seen()  # one consistent pair (written at once)
            stamp = wall if busy else last
            if self.written.get(kernel.kid) != stamp:
                self.written[kernel.kid] = stamp
                try:
                    os.utime(os.path.join(kernel.run_dir, ACTIVITY_FILE), (stamp, stamp))
                except OSError:
                    pass
            idle = should_reap(kernel, wall)
            if idle is not None:
                self.reap(kernel, idle)
        for table in (self.written, self.told):
            for kid in [k for k in table if k not in self.agent.kernels]:
                del table[kid]

    def note(self, kernel, activity):
        """Log (once each) that a kernel's activity went unseen or forgotten."""
        told = self.told.get(kernel.kid, (False, 0))
        now = (activity.blind, activity.forgotten)
        if now == told:
            return
        self.told[kernel.kid] = now
        if now[0] and not told[0]:
            self.log(
                "kernel %s: its iopub could not be followed: its activity is not seen,"
                " its idle timeout no longer applies" % kernel.kid
            )
        if now[1] > told[1]:
            self.log(
                "kernel %s: more than %d requests busy at once: the oldest counts as"
                " finished (%d so far)" % (kernel.kid, REMEMBERED, now[1])
            )

    def reap(self, kernel, idle):
        agent = self.agent
        if agent.kernels.get(kernel.kid) is not kernel:
            return
        del agent.kernels[kernel.kid]  # the loop no longer reaps it: the worker does
        timeout = idle_timeout(kernel.request)
        pid = kernel.proc.pid if kernel.proc else "?"

        def tell(code):
            self.log(
                "kernel %s (pid %s) shut down after %.0f s idle (idle timeout %g s)"
                % (kernel.kid, pid, idle, timeout)
            )
            kernel.emit(
                Event.EXITED,
                code=code,
                stderr_tail="",
                reason=IDLE_TIMEOUT,
                idle_s=round(idle, 1),
                idle_timeout=timeout,
            )

        def still_idle():
            return should_reap(kernel, time.time()) is not None

        def done(code):  # on the loop
            if code is not None:
                return tell(code)
            if agent.kernels.get(kernel.kid) is None:
                agent.kernels[kernel.kid] = kernel  # active again: the loop has it back
                self.log("kernel %s: active again before its idle shutdown, kept" % kernel.kid)
                return None
            agent.spawn(lambda: shut_down(kernel, self.log), then=tell)  # its kid is taken
            return None

        agent.spawn(lambda: shut_down(kernel, self.log, still_idle), then=done)

    def log(self, line):
        """A line of the agent's log: its stderr and ``agent.log`` in its agent dir."""
        text = "sshpyk agent %d %s: %s\n" % (
            os.getpid(),
            time.strftime("%Y-%m-%dT%H:%M:%S"),
            line,
        )
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # the channel is gone: the file still has it
        if self.agent.agent_dir:
            try:
                with open(os.path.join(self.agent.agent_dir, "agent.log"), "a") as f:
                    f.write(text)
            except OSError:
                pass
