"""The agent: one per (SSH connection, remote python, pre-command), supervising every
kernel started through it, so starting a kernel on an open connection costs no new SSH
session, shell or interpreter.

One loop (:meth:`Agent.run`) owns the agent's state; everything else posts to its
queue ``events``: controllers (the local sides: the SSH channel's stdio, reattached
sockets) their requests, launchers their events, workers their results, and SIGCHLD
a reap (the loop polls its kernels' processes: no waiter thread per kernel). Slow
work (killing a process group: up to TERM_WAIT per kernel; a scheduler's commands: up to
15 s; scans of run roots) runs in a small bounded pool of worker threads
(:meth:`Agent.spawn`) whose results come back to the loop, so heartbeats and other
requests are answered meanwhile. The kernels' relayed connections are on the
process's one event loop (relayio.py). So an agent's threads do not grow with its
kernels: this loop, the event loop, one reader per local side, the control socket's
acceptor, at most MAX_WORKERS workers and one discovery thread (idle ones end).

Several local sides may be attached at once (an owner and ``sshpyk attach``); events
go to all of them. When no local side has been heard for ``grace`` seconds (a dropped
link, a crashed client) the agent stops every non-persistent kernel; a kernel that
exits on its own is reaped at once. The HMAC key only travels over stdin and into a
0600 file in a 0700 directory. Another user must not be able to steer the agent: see
paths.py and records.py.
"""

import os
import queue
import signal
import socket
import sys
import threading
import time

from . import direct  # noqa: F401  (registers the direct launcher)
from .direct import tail
from .discover import discover
from .idle import IdleWatch
from .jsonlines import Output
from .kernelspecs import describe_kernelspec, jupyter_client_version
from .launcher import launcher_class
from .links import open_dispatch
from .loader import install
from .owners import NOBODY, Owners, socket_controller, stdio_controller
from .paths import (
    checked_run_root,
    default_run_roots,
    peer_credentials,
    private_run_dir,
    remove_tree,
    write_json_atomic,
)
from .ports import PortScanner
from .procgroup import CLEANING, KILL_WAIT, TERM_WAIT, pid_alive
from .protocol import AgentError, Event, Kind, Op
from .records import annotate, kill_run_dir, request_owner, scan, sweep
from .spares import Spares
from .usage import Usage
from .workers import Workers, cleanup_all

#: seconds after a launch before its spares are topped up (see spares.py)
SPARE_REFILL_DELAY = 2.0
#: seconds between scans for the kernels' web ports (ports.py), all kernels at once
PORT_SCAN_INTERVAL = 1.0
#: seconds the agent's exit waits for its remaining workers, all together
WORKERS_JOIN = TERM_WAIT + KILL_WAIT + 20.0


class Agent:
    def __init__(self, hello):
        #: a SimpleQueue: put() is safe in a signal handler (SIGCHLD's reap)
        self.events = queue.SimpleQueue()
        #: kid -> launcher. The loop adds and removes; a kill worker may remove too
        #: (dict.pop is atomic): the loop iterates over snapshots (list(...)) only
        self.kernels = {}
        #: requests being served by workers (each a token until its "done")
        self.workers = set()
        self.pool = Workers()
        self.discovery = Workers(1)  # discover: its own thread, one at a time (below)
        #: (due, kind, value): events the loop posts to itself later
        self.timers = []
        self.port_scanner = PortScanner()
        self.ports_scanned = 0.0
        self.ports_watched = False  # some kernel's web ports are watched (scan_ports)
        #: controllers at EOF while workers ran: detached once no worker is left (the
        #: answers of their last requests still go out: the channel's stdout may be open)
        self.closing = []
        self.output = Output()
        self.run_root = hello.get("run_root")
        #: seconds an owner's kernels are kept once it is known to be gone, and for an
        #: owner that went away without a word (owners.py)
        self.grace = float(hello.get("grace") or 0)
        #: seconds a relay session waits for its link (links.py) and an owner's kernels
        #: for their owner, who went away without a word
        self.link_grace = max(self.grace, float(hello.get("link_grace") or self.grace))
        self.owners = Owners(self.grace, self.link_grace)
        #: said in every hello (only this uid hears one): a joining process checks it
        #: before it sends anything on a stream to the control socket
        self.token = os.urandom(16).hex()
        #: the token of the local process whose stdio hello started this agent
        self.first_owner = hello.get("owner") or NOBODY
        self.spares = Spares(self)
        self.idle = IdleWatch(self)  # activity in ps, the idle timeout (idle.py)
        self.usage = Usage()  # what ps says each kernel costs: samples kept between asks
        self.controllers = set()
        self.agent_dir = None
        self.socket_path = None
        self.listener = None
        self.links = None  # links.LinkDispatch: relay links opened ahead of a launch
        self.exiting = False  # a shutdown left nothing to keep: exit once workers are done

    # -- control socket, for reattaching after the SSH connection was lost ---------
    def open_socket(self):
        # The first root where the socket path fits in sun_path (~104 bytes on macOS);
        # `ps` scans the same roots, so the agent is found wherever it went.
        for root in default_run_roots(self.run_root):
            if len(os.path.join(root, "sshpyk-agent-12345678", "agent.sock")) < 104:
                break
        else:
            return  # no short enough place: reattach is impossible, the rest works
        try:
            self.agent_dir = private_run_dir(root, "agent")
        except AgentError:
            return
        path = os.path.join(self.agent_dir, "agent.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener = listener  # closed by cleanup, whatever fails below
        listener.bind(path)
        listener.listen(4)
        self.socket_path = path
        record = {"pid": os.getpid(), "started": time.time(), "grace": self.grace, "socket": path}
        # written last, atomically: a dir with agent.json has a listening socket
        self.links = open_dispatch(self.agent_dir)
        write_json_atomic(self.agent_dir, "agent.json", record)
        self.touch()
        threading.Thread(target=self._accept, name="accept", daemon=True).start()

    def _accept(self):
        while True:  # ends when cleanup closes the listener
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            creds = peer_credentials(conn)
            if creds is not None and creds[1] != os.getuid():
                conn.close()  # only this user may attach (the dir is 0700 as well)
                continue
            self.events.put(("attach", socket_controller(self, conn)))

    def touch(self):
        if self.agent_dir:
            try:
                with open(os.path.join(self.agent_dir, "contact"), "w"):
                    pass
            except OSError:
                pass

    # -- workers ----------------------------------------------------------------------
    def spawn(self, work, msg=None, then=None, pool=None):
        """Run ``work()`` in a worker (of ``pool``, default the bounded pool). The loop
        then calls ``then(result)`` (which may return "exit"); an exception of ``work`` is
        reported as the error of the request ``msg`` (without ``msg``: ignored)."""
        box = {}
        token = object()

        def run():
            try:
                box["result"] = work()
            except AgentError as exc:
                box["error"] = (exc.kind, exc.message)
            except Exception as exc:
                box["error"] = (Kind.INTERNAL, "%s: %s" % (type(exc).__name__, exc))
            self.events.put(("done", (token, msg, then, box)))

        self.workers.add(token)
        (pool or self.pool).submit(run)
        return token

    def later(self, delay, kind, value):
        """Post ``(kind, value)`` to the loop in ``delay`` seconds."""
        self.timers.append((time.monotonic() + delay, kind, value))

    def reap(self):
        """Hand the loop's kernels whose process ended to their launcher."""
        for kernel in list(self.kernels.values()):
            if kernel.exit_code is None and self.kernels.get(kernel.kid) is kernel:
                code = kernel.poll_exit()
                if code is not None:
                    kernel.on_exit(code)

    def scan_ports(self):
        """One scan for the web ports of every watched kernel (ports.py), keyed by the
        launcher (one per kernel process); each tells the local side when its list
        changed."""
        watched = {}
        for kernel in list(self.kernels.values()):
            ports = kernel.watched_ports()
            if ports is not None:
                watched[kernel] = ports
        self.ports_watched = bool(watched)
        if watched:
            for kernel, ports in self.port_scanner.scan(watched).items():
                kernel.set_ports(ports)

    def _done(self, token, msg, then, box):
        self.workers.discard(token)
        try:
            if "error" in box:
                if msg is not None:
                    self._failed(msg, *box["error"])
                return None
            return then(box.get("result")) if then is not None else None
        finally:
            if not self.workers:
                while self.closing:
                    self.detach(self.closing.pop())

    # -- the loop -------------------------------------------------------------------
    def hello(self, writer):
        self.output.emit(
            Event.HELLO,
            _only=writer,
            pid=os.getpid(),
            python=sys.executable,
            python_version="%d.%d.%d" % sys.version_info[:3],
            jupyter_client=jupyter_client_version(),
            socket=self.socket_path,
            relay=self.links and self.links.path,
            token=self.token,
            kernels=len(self.kernels),
        )

    def attach(self, controller):
        """Add a local side. Several may be attached (an owner and `sshpyk attach`).

        It counts as heard from (grace, contact) at its first message only: a liveness
        probe (`ps` connecting to the socket, see records.probe_agent) must not extend
        the grace period of an agent whose local side is gone."""
        self.hello(controller.writer)
        self.output.add(controller.writer)
        self.controllers.add(controller)
        controller.start()

    def detach(self, controller):
        self.controllers.discard(controller)
        self.output.remove(controller.writer)
        controller.close()

    def run(self, controller=None):
        """Serve ``controller`` (default: this process's stdio, whose hello was read)
        and whoever attaches later, until nobody is attached and no kernel runs, or a
        ``shutdown`` leaves nothing to keep."""
        if self.run_root:
            self.run_root = checked_run_root(self.run_root, create=True)
        if threading.current_thread() is threading.main_thread():
            # a child ended: reap at once (each tick reaps too, e.g. without the handler)
            signal.signal(signal.SIGCHLD, lambda *_: self.events.put(("reap", None)))
        self.open_socket()
        self.spawn(self._startup_sweep)
        controller = controller or stdio_controller(self)
        controller.heard = True  # the hello was its first message
        self.attach(controller)
        self.owners.claim(controller, self.first_owner)
        self.touch()
        while True:  # ends with the conditions above
            kernels = list(self.kernels.values())
            starting = [k for k in kernels if k.polls_ready and not k.ready and k.exit_code is None]
            timeout = 0.01 if starting else 1.0
            if self.ports_watched:  # the next scan on time, not a tick after it
                due = self.ports_scanned + PORT_SCAN_INTERVAL - time.monotonic()
                timeout = max(0.0, min(timeout, due))
            if self.timers:
                timeout = max(0.0, min(timeout, min(t[0] for t in self.timers) - time.monotonic()))
            try:
                kind, value = self.events.get(timeout=timeout)
            except queue.Empty:
                kind, value = None, None
            if self.dispatch(kind, value) == "exit":
                self.exiting = True
            if self.exiting and not self.workers:
                return  # every request answered
            now = time.monotonic()
            for timer in [t for t in self.timers if t[0] <= now]:
                self.timers.remove(timer)
                self.dispatch(timer[1], timer[2])
            self.reap()
            self.idle.tick(time.monotonic())
            for kernel in starting:
                kernel.check_ready()
            now = time.monotonic()
            if now - self.ports_scanned >= PORT_SCAN_INTERVAL:
                self.ports_scanned = now
                self.scan_ports()
            expired = self.owners.expired(now)
            for owner in expired:
                # the owner is gone: stop what it does not want kept
                owner.detached = True
                self.stop_kernels(keep_persistent=True, owner=owner.token)
            if expired and not self.owners.any_active():
                self.stop_kernels(keep_persistent=True, owner=NOBODY)  # nobody left: spares
            kernels = list(self.kernels.values())
            if (
                not self.controllers
                and all(k.exit_code is not None for k in kernels)
                # a kernel that ended while its local side reconnects (its data path
                # resumes first): wait for the reattach to hear how, up to the grace
                and (
                    not kernels
                    or self.owners.all_detached({k.owner for k in kernels})
                    or now - self.owners.last_contact() > self.grace
                )
            ):
                return  # nobody to serve and nothing alive to keep

    def dispatch(self, kind, value):
        """One event of the queue, on the loop; "exit" to end the loop."""
        if kind == "attach":
            self.attach(value)
        elif kind == "eof":
            # a local side left or its link dropped: a reattach may follow (its grace)
            self.owners.left(value)  # nothing for a controller that never claimed
            if self.workers:
                self.closing.append(value)
            else:
                self.detach(value)
        elif kind == "msg":
            controller, msg = value
            if controller in self.controllers:
                op = msg.get("op")
                if op == Op.GONE:  # a last will: no contact, nobody's controller
                    self.owners.said_gone(msg.get("owner"))
                    return None
                if not controller.heard:
                    controller.heard = True
                    self.touch()
                if op == Op.CLAIM:
                    self.owners.claim(controller, msg.get("owner"))
                else:
                    self.owners.heard(controller)
                if op == Op.PING:
                    self.touch()
                return self.handle(msg, controller)
        elif kind == "exit":
            kid, code = value
            kernel = self.kernels.get(kid)
            if kernel is not None and kernel.exit_code is None:
                kernel.on_exit(code)
        elif kind == "event":
            kid, event = value
            kernel = self.kernels.get(kid)
            if kernel is not None:
                kernel.on_event(event)
        elif kind == "fail":
            self.fail_start(*value)
        elif kind == "fill":
            if self.owners.any_active() and not self.exiting:
                self.spares.fill(value)
        elif kind == "done":
            return self._done(*value)
        return None

    def handle(self, msg, controller=None):
        owner = controller.owner if controller is not None else None
        op = msg.get("op")
        kid = msg.get("kid")
        rid = msg.get("rid")
        emit = self.output.emit
        try:
            if op == Op.LAUNCH:
                if kid in self.kernels:
                    raise AgentError(Kind.PROTOCOL, "kernel %s already exists" % kid)
                kernel = self.spares.take(kid, msg)
                if kernel is not None:
                    self.kernels[kid] = kernel  # a warm spare: started and bound already
                    kernel.owner = owner.token if owner is not None else NOBODY
                else:
                    kernel = launcher_class(msg.get("launcher"))(self, msg)
                    self.kernels[kid] = kernel
                    kernel.owner = owner.token if owner is not None else NOBODY
                    kernel.launch()
                if msg.get("prestart"):
                    # spares later: not competing with this kernel's first steps
                    self.later(SPARE_REFILL_DELAY, "fill", msg)
            elif op == Op.SIGNAL:
                if kid in self.kernels:
                    self.kernels[kid].signal(int(msg["signum"]))
            elif op == Op.STOP:
                # off the loop: TERM may take TERM_WAIT seconds; other kernels go on
                kernel = self.kernels.pop(kid, None)
                if kernel is not None:  # a restart: a launch of the same kid follows
                    kernel.keep_allocation = bool(msg.get("keep_allocation"))
                self.spawn(
                    kernel.cleanup if kernel is not None else lambda: None,
                    msg,
                    lambda _: emit(Event.STOPPED, kid=kid),
                )
            elif op in (Op.FORWARDED, Op.CLIENT):
                kernel = self.kernels.get(kid)
                if kernel is not None and op == Op.CLIENT:
                    kernel.set_client(msg.get("client"))
                elif kernel is not None:
                    kernel.set_forwards(list(msg.get("forwards") or []))
            elif op == Op.STATE:
                states = [k.state() for k in list(self.kernels.values())]
                emit(Event.STATE, rid=rid, kernels=states)
            elif op == Op.CONNECTION_INFO:
                kernel = self.kernels.get(kid)
                if kernel is None:
                    raise AgentError(Kind.NOT_FOUND, "no kernel %s in this agent" % kid)
                emit(Event.CONNECTION_INFO, rid=rid, info=kernel.connection_info())
            elif op == Op.INSPECT:
                name = msg["kernel_name"]
                self.spawn(
                    lambda: describe_kernelspec(name),
                    msg,
                    lambda spec: emit(Event.INFO, rid=rid, kernelspec=spec),
                )
            elif op == Op.PS:
                self.spawn(
                    lambda: self.ps(msg), msg, lambda found: emit(Event.PS, rid=rid, kernels=found)
                )
            elif op == Op.KILL:
                self.spawn(
                    lambda: self.kill(msg),
                    msg,
                    lambda killed: emit(Event.KILLED, rid=rid, kernels=killed),
                )
            elif op == Op.LOAD:
                modules = msg.get("modules")
                if not isinstance(modules, dict):
                    raise AgentError(Kind.PROTOCOL, "a load request needs its modules")
                install(modules, __package__)
                emit(Event.LOADED, rid=rid, name=msg.get("name"))
            elif op == Op.PROBE:
                probe = launcher_class(msg.get("launcher")).probe
                args = msg.get("args")
                self.spawn(
                    lambda: probe(args),
                    msg,
                    lambda info: emit(Event.PROBE, rid=rid, **info),
                )
            elif op == Op.DISCOVER:  # up to its limit: not in the pool the kernels need
                if self.discovery.busy():
                    raise AgentError(
                        Kind.BUSY, "another discovery runs in this agent: retry once it ends"
                    )
                self.spawn(
                    lambda: discover(msg),
                    msg,
                    lambda found: emit(Event.DISCOVERED, rid=rid, **found),
                    self.discovery,
                )
            elif op == Op.SHUTDOWN:
                # an owner closes on purpose: its kernels (persistent ones only if asked)
                leaving = owner or self.owners.of(NOBODY)
                leaving.detached = True

                def bye(_):
                    # "bye" tells the local side whether to wait for this agent to exit:
                    # not while kernels run or other owners are attached
                    kept = len(self.kernels) + int(self.owners.others_attached(leaving))
                    emit(Event.BYE, rid=rid, kept=kept)
                    return "exit" if not kept else None

                keep = bool(msg.get("keep_persistent"))
                self.stop_kernels(keep, then=bye, owner=leaving.token, spares=True)
            elif op not in (Op.PING, Op.CLAIM):
                raise AgentError(Kind.PROTOCOL, "unknown op %r" % op)
        except AgentError as exc:
            self._failed(msg, exc.kind, exc.message)
        except Exception as exc:  # report, and keep serving the other kernels
            self._failed(msg, Kind.INTERNAL, "%s: %s" % (type(exc).__name__, exc))
        return None

    # -- requests served by workers ------------------------------------------------------
    def ps(self, msg):
        """Every sshpyk kernel in the run roots (of this user; ``all_users``: of all),
        after the stale sweep, with what each launcher adds (a worker); ``usage``: and
        what each costs (usage.py)."""
        owner = request_owner(msg)
        found = scan(default_run_roots(msg.get("run_root") or self.run_root), owner)
        removed = sweep(found, keep=self.own_dirs())
        kernels = annotate([k for k in found[0] if k["run_dir"] not in removed])
        return self.usage.annotate(kernels) if msg.get("usage") else kernels

    def kill(self, msg):
        """Kill the kernels a ``kill`` request names (``kernel_id``: an id or a unique
        prefix; ``orphans``: all without a live local side), of this user or, with
        ``all_users`` (root only), of everybody. Each entry of the answer says whether
        it was ``killed`` and, if not or not wholly, the ``error``. Then the stale sweep.
        A worker: a kernel of this agent is taken out of ``kernels`` (atomically) first."""
        owner = request_owner(msg)
        roots = default_run_roots(msg.get("run_root") or self.run_root)
        wanted = msg.get("kernel_id")
        found = scan(roots, owner)
        killed = []
        for info in found[0]:
            if wanted and not str(info.get("kernel_id", "")).startswith(str(wanted)):
                continue
            if not wanted and (info["attached"] or not msg.get("orphans")):
                continue
            mine = self.kernels.get(info.get("kernel_id"))
            if (
                mine is not None
                and info["uid"] == os.getuid()
                and mine.run_dir
                and os.path.realpath(mine.run_dir) == os.path.realpath(info["run_dir"])
            ):
                self.kernels.pop(mine.kid, None)
                pid = mine.proc.pid if mine.proc is not None else 0
                mine.cleanup()
                error = None
                if pid > 1 and pid_alive(pid):
                    error = "pid %d still runs" % pid
                elif os.path.lexists(info["run_dir"]):
                    error = "cannot remove %s" % info["run_dir"]
            else:
                error = kill_run_dir(info)
            info["killed"] = error is None
            info["error"] = error
            killed.append(info)
        if wanted and not killed:
            raise AgentError(Kind.NOT_FOUND, "no sshpyk kernel %s on this host" % wanted)
        handled = {k["run_dir"] for k in killed}
        sweep(found, keep=self.own_dirs() | handled)
        return killed

    def own_dirs(self):
        """This agent's dirs: its own and its kernels' run dirs (the sweep leaves them)."""
        dirs = {k.run_dir for k in list(self.kernels.values()) if k.run_dir}
        if self.agent_dir:
            dirs.add(self.agent_dir)
        return dirs

    def _startup_sweep(self):
        """The stale sweep when an agent starts (a worker: it does not delay hello;
        debris it cannot remove stays for the next sweep)."""
        sweep(scan(default_run_roots(self.run_root), os.getuid()), keep=self.own_dirs())

    def stop_kernels(self, keep_persistent, then=None, owner=None, spares=False):
        """Take the kernels of ``owner`` (a token; None: all; ``spares``: the spares
        too when no other owner is attached), but the persistent ones if
        ``keep_persistent``, out of the agent and stop them in a worker; ``then`` as
        for :meth:`spawn`."""
        spares = spares and not self.owners.others_attached(self.owners.of(owner))
        stopping = []
        for kid, kernel in list(self.kernels.items()):
            mine = owner is None or kernel.owner == owner or (spares and kernel.owner == NOBODY)
            if mine and not (keep_persistent and kernel.persistent):
                self.kernels.pop(kid, None)
                stopping.append(kernel)
        self.spawn(lambda: cleanup_all(stopping), then=then)

    def fail_start(self, kid, kind, message):
        """A kernel cannot start (e.g. its batch job waited too long): clean up, then tell."""
        kernel = self.kernels.get(kid)
        if kernel is None or not kernel.start_failed():
            return
        del self.kernels[kid]
        kernel.exit_code = -1
        # the message says it all: the tail is read after the cleanup (the run dir and
        # its log are gone then, as a queue timeout's srun output adds nothing)
        self.spawn(
            kernel.cleanup,
            then=lambda _: self.output.emit(
                Event.ERROR,
                kid=kid,
                kind=kind,
                message=message,
                stderr_tail=tail(kernel.log_path) if kernel.log_path else "",
            ),
        )

    def _failed(self, msg, kind, message):
        kid = msg.get("kid")
        fields = {"kid": kid, "rid": msg.get("rid"), "kind": kind, "message": message}
        kernel = self.kernels.pop(kid, None) if msg.get("op") == Op.LAUNCH else None
        if kernel is None:
            self.output.emit(Event.ERROR, **fields)
        else:  # a launch that failed half way: clean up (a worker), then tell
            self.spawn(kernel.cleanup, then=lambda _: self.output.emit(Event.ERROR, **fields))

    def cleanup(self):
        """On every way out of run(): the agent dir goes first (nobody can attach to an
        agent that is leaving), then every kernel, each whatever the others do, then
        the workers still running (bounded)."""
        CLEANING.set()  # SIGTERM no longer interrupts (see main.run)
        try:
            if self.listener is not None:
                self.listener.close()
            if self.links is not None:
                self.links.close()
        finally:
            if self.agent_dir:
                remove_tree(self.agent_dir)
            kernels = list(self.kernels.values())
            self.kernels.clear()
            cleanup_all(kernels)
            self.pool.wait_idle(WORKERS_JOIN)
