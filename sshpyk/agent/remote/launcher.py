"""The remote launcher contract: how the agent starts, watches and stops one kernel.

A launcher is a subclass of :class:`Launcher`, one module per launcher (``direct.py``,
one per batch scheduler), registered with :func:`register` under its ``name`` (the
launch request's ``launcher``). The agent only ever talks to a kernel through these
methods; nothing else in the agent knows which launcher a kernel has. A new scheduler
(PBS, LSF) is one new module here (a subclass of batch.BatchKernel, which holds what
every scheduler shares) and one on the local side; its error kinds are its own
strings, mapped to classes by its local module.

Threads: the agent runs one loop (``agent.py``); every method below is called on it
unless it says otherwise, and must return quickly. A kernel's relayed connections run
on the process's event loop (relayio.py), not in threads of their own. A launcher
that needs threads (a scheduler's stdio readers) keeps them off the agent's state:
they post ``("exit", (kid, code))`` or ``("event", (kid, event))`` to
``agent.events``, which the loop hands to :meth:`on_exit` and :meth:`on_event`.
Events go out with ``agent.output.emit`` (thread safe).
"""

import abc
import os
import threading
import time

from .idle import Activity, create_activity_file, idle_timeout
from .links import LinkServer
from .paths import remove_tree, write_json_atomic
from .procgroup import stop_group
from .protocol import AgentError, Event, Kind

#: launcher name -> class; a module registers its launcher when it is installed
LAUNCHERS = {}  # type: dict


def register(cls):
    """Class decorator: make ``cls`` the launcher for requests naming ``cls.name``."""
    LAUNCHERS[cls.name] = cls
    return cls


def launcher_class(name, launchers=None):
    """The launcher class registered as ``name``; AgentError ``protocol`` if none is."""
    launchers = LAUNCHERS if launchers is None else launchers
    cls = launchers.get(name or "direct")
    if cls is None:
        raise AgentError(
            Kind.PROTOCOL,
            "the %r launcher is not loaded in this agent (loaded: %s)"
            % (name, ", ".join(sorted(launchers)) or "none"),
        )
    return cls


class Launcher(abc.ABC):
    """One kernel supervised by the agent.

    Life: ``__init__`` (nothing runs yet) -> :meth:`launch` -> ready (the loop sets
    ``ready`` and emits ``ready``) -> exit (:meth:`on_exit`) or :meth:`cleanup`. After
    :meth:`cleanup` nothing of the kernel runs and its run dir is gone.
    """

    #: the launch request's ``launcher`` value
    name = ""
    #: True: the loop calls :meth:`check_ready` until ready (every 10 ms); False: the
    #: launcher says when it is ready through an event (see :meth:`on_event`)
    polls_ready = True
    #: True: the stale sweep must kill what a dead kernel's record names (a batch job
    #: can outlive its step), not just remove its run dir
    sweep_kills = False
    #: True: the agent may keep warm spares of this launcher's kernels (spares.py): a
    #: spare must cost nothing beyond its process (a scheduler's would hold an
    #: allocation nobody asked for)
    holds_spares = False
    #: True: the kernel's processes run next to the agent, which finds their TCP
    #: listeners (ports.py) when the request asks (``auto_forward``); a launcher
    #: whose kernels run elsewhere reports them itself (``ports`` events)
    scans_ports = False
    #: True: the kernel's processes run on this host: ``ps`` reads what they cost from
    #: /proc (usage.py); a launcher whose kernels run elsewhere leaves it False
    runs_here = False

    def __init__(self, agent, request):
        self.agent = agent
        self.request = request
        self.kid = request["kid"]
        self.persistent = bool(request.get("persistent"))
        #: the token of the local process whose kernel this is (owners.py; "": a spare)
        self.owner = ""
        self.proc = None  # the process this launcher started (its group's leader)
        self.run_dir = None
        self.log_path = None
        self.transport = None
        self.endpoints = {}
        #: the resumable relay (links.py) and its socket, once started (start_links)
        self.links = None
        self.relay = None
        #: what the relay saw it do last (idle.py), None without a relay
        self.activity = None
        self.started_fields = {}  # what ``started`` said (adopt says it again)
        self.ready = False
        #: set by a ``stop``: True for a restart (keep what the next launch of this kid
        #: reuses: a batch job's allocation), False to release all; None: no stop request
        self.keep_allocation = None
        self.exit_code = None
        #: the web ports found (ports.py): [{"port", "host"[, "path"]}], as last told
        self.web_ports = []
        #: where the local side forwards them (``forwarded``: for ``ps``)
        self.forwards = []
        self.info = {}
        self._cleanup_lock = threading.Lock()
        self._cleaned = False

    # -- the contract ----------------------------------------------------------------
    @abc.abstractmethod
    def launch(self):
        """Start the kernel without waiting for it: make its run dir, start its process,
        write its record (:meth:`describe`) and emit ``started``. Raise AgentError if it
        cannot start; the agent then calls :meth:`cleanup` and reports the error."""

    def check_ready(self):
        """Called by the loop while ``polls_ready`` and the kernel is neither ready nor
        exited: set ``ready`` and emit ``ready`` once its five sockets accept."""
        return None

    @abc.abstractmethod
    def on_exit(self, code):
        """The launcher's process exited with ``code`` (posted as ``exit``): set
        ``exit_code``, emit ``exited`` (or ``error`` if it was not ready yet) and reap
        what is left (not blocking the loop)."""

    def on_event(self, event):
        """An event the launcher's own threads posted (``("event", (kid, event))``)."""
        return None

    def poll_exit(self):
        """Called by the loop (each tick, and when a child exits): the exit code of
        the launcher's process if it ended, else None. Launchers that post ``exit``
        themselves keep the default."""
        return None

    @abc.abstractmethod
    def signal(self, signum):
        """Deliver ``signum`` to the kernel's process group (an interrupt, a TERM)."""

    @abc.abstractmethod
    def _cleanup(self):
        """Stop the kernel (TERM, wait, KILL its group; end its job), remove its run dir.
        Runs once (see :meth:`cleanup`); may block for seconds."""

    def cleanup(self):
        """Stop the kernel and remove its run dir. Idempotent and thread safe (a second
        caller waits for the first); may block for seconds: the agent calls it from a
        worker thread, never on its loop, unless the kernel's process already exited."""
        with self._cleanup_lock:
            if self._cleaned:
                return
            self._cleaned = True
            try:
                self._cleanup()
            finally:
                if self.links is not None:
                    self.links.close()
                    if self.agent.links is not None:
                        self.agent.links.unregister(self.kid, self.links)

    @property
    def cleaned(self):
        return self._cleaned

    def state(self):
        """What a ``state`` answer says of this kernel (a reattaching local side)."""
        return {
            "kid": self.kid,
            "pid": self.proc.pid if self.proc else None,
            "run_dir": self.run_dir,
            "transport": self.transport,
            "endpoints": self.endpoints,
            "relay": self.relay,
            "relay_ahead": bool(self.relay),
            "ready": self.ready,
            "exit_code": self.exit_code,
            "persistent": self.persistent,
            "launcher": self.name,
            "ports": self.web_ports,
        }

    @abc.abstractmethod
    def connection_info(self):
        """The connection file a reattaching local side uses (with the key); AgentError
        ``not_found`` if there is none yet."""

    def start_failed(self):
        """Whether a ``fail`` the launcher posted (e.g. a queue timeout) still applies:
        False once the kernel runs after all."""
        return not self.ready and self.exit_code is None

    # -- records of kernels found in run roots (``ps``, ``kill``, the sweep) -------------
    @classmethod
    def annotate(cls, records):
        """Add what ``ps`` shows beyond the record to this launcher's ``records`` (dicts
        read from run dirs, see records.scan), e.g. the scheduler's state. Runs in a
        worker thread; may call slow commands (bounded)."""
        return records

    @classmethod
    def kill_record(cls, info, verified_pid):
        """For ``kill`` and the sweep, in a worker thread: stop the kernel a record of
        this launcher names. ``verified_pid``: its pid, checked to be the kernel's (0 if
        it is not running or cannot be verified: then only what the record names
        besides a pid, e.g. a job, may be acted on). Returns a list of one-line errors."""
        error = stop_group(verified_pid) if verified_pid > 1 else None
        return [error] if error else []

    @classmethod
    def probe(cls, args):
        """For a ``probe`` request, in a worker thread: whether this launcher can run
        kernels here (with ``args``: whether its scheduler takes them as job
        arguments), a JSON-able dict; AgentError if it cannot. Default: ``{}``."""
        return {}

    # -- web ports -----------------------------------------------------------------------
    def watched_ports(self):
        """(pid, run_dir, own ports) for the port scan, or None if not watched."""
        if not (self.scans_ports and self.request.get("auto_forward", True)):
            return None
        if self.proc is None or self.exit_code is not None or not self.ready:
            return None
        own = set(p for p in self.endpoints.values() if isinstance(p, int))
        return (self.proc.pid, self.run_dir, own)

    def set_ports(self, ports):
        """The web ports found now (a list of dicts): told and recorded if changed."""
        if ports != self.web_ports:
            self.web_ports = ports
            self.info["ports"] = ports
            self.write_info()
            self.emit(Event.PORTS, ports=ports)

    def set_client(self, client):
        """Who drives the kernel now (``client``: e.g. ``sshpyk attach``): in the record."""
        self.info["client"] = str(client or "")[:40] or None
        self.write_info()

    def set_forwards(self, forwards):
        """Where the local side forwards the web ports: in the record (``ps``)."""
        self.forwards = forwards
        self.info["forwards"] = forwards
        self.write_info()

    # -- helpers for launchers -----------------------------------------------------------
    def emit(self, event, **fields):
        self.agent.output.emit(event, kid=self.kid, **fields)

    def start_links(self):
        """Listen for the kernel's resumable relay (links.py) on ``r`` in its run
        dir, unless the request turns it off (``outage_buffer`` 0) or the path does
        not fit in sun_path: then the local side forwards to the sockets directly."""
        mib = self.request.get("outage_buffer", 64)
        path = os.path.join(self.run_dir or "", "r")  # as short as the kernel's k-N
        if mib and self.run_dir and len(path.encode()) <= 104:
            activity = Activity()
            try:
                budget = int(float(mib) * (1 << 20))
                target = self.endpoints.__getitem__
                self.links = LinkServer(path, target, budget, self.agent.link_grace, activity)
                self.relay, self.activity = path, activity
                if self.agent.links is not None:  # links opened ahead name the kernel
                    self.agent.links.register(self.kid, self.links)
                create_activity_file(self.run_dir)
            except Exception:
                pass  # the local side then forwards to the sockets directly
        if self.activity is None and idle_timeout(self.request):
            self.agent.idle.log(
                "kernel %s has no relay (outage_buffer 0, or its run dir is too long for a"
                " unix socket): its activity is not seen, its idle timeout does not apply"
                % self.kid
            )

    def adopt(self, kid, request):
        """A warm spare (spares.py) becomes kernel ``kid`` of ``request``: the same
        process and key, a new id; tell the local side (``started`` with the key, then
        ``ready`` if it is)."""
        if self.links is not None and self.agent.links is not None:
            self.agent.links.unregister(self.kid, self.links)
            self.agent.links.register(kid, self.links)
        self.kid = kid
        self.persistent = bool(request.get("persistent"))
        self.request = dict(
            self.request,
            kid=kid,
            persistent=self.persistent,
            spare=False,
            idle_timeout=request.get("idle_timeout"),
        )
        self.info.update(kernel_id=kid, persistent=self.persistent, spare=False)
        if self.activity is not None:
            self.activity.last = time.time()  # a spare's idle time is not its user's
        self.info["client"] = request.get("client")
        self.write_info()
        self.emit(Event.STARTED, key=self.request["key"], **self.started_fields)
        if self.ready:
            self.emit(Event.READY)

    def emit_started(self, argv, spec, endpoints, **extra):
        """Tell the local side the kernel's process exists (``started``); its
        resumable relay listens from then on."""
        self.start_links()
        self.started_fields = dict(
            pid=self.proc.pid,
            pgid=self.proc.pid,
            run_dir=self.run_dir,
            transport=self.transport,
            endpoints=endpoints,
            argv=argv,
            resource_dir=spec.get("resource_dir"),
            language=spec.get("language"),
            launcher=self.name,
            relay=self.relay,
            relay_ahead=bool(self.relay),  # its relay gives ZMTP's first bytes ahead
            **extra,
        )
        self.emit(Event.STARTED, **self.started_fields)

    def describe(self, argv, **extra):
        """Write the record `sshpyk ps` shows of this kernel (never the key)."""
        self.info = {
            "kernel_id": self.kid,
            "kernel_name": self.request["kernel_name"],
            "pid": self.proc.pid,
            "agent_pid": os.getpid(),
            "started": time.time(),
            "transport": self.transport,
            "persistent": self.persistent,
            "argv": argv,
            "launcher": self.name,
            "spare": bool(self.request.get("spare")),
            # what drives it: provisioner, argv, api (the launch request's), attach
            "client": self.request.get("client"),
        }
        self.info.update(extra)
        self.write_info()

    def write_info(self):
        """sshpyk.json in the run dir, replaced atomically (`ps` may read it any time)."""
        if self.run_dir:
            try:
                write_json_atomic(self.run_dir, "sshpyk.json", self.info)
            except OSError:
                pass  # the run dir is being removed

    def remove_run_dir(self):
        if self.run_dir:
            remove_tree(self.run_dir)
            self.run_dir = None

    def report_exit(self, code, stderr_tail, error=None):
        """Emit ``exited``, or ``error`` (``error``: (kind, message), default
        ``kernel_exited``) if the kernel was not ready yet."""
        if self.ready:
            self.emit(Event.EXITED, code=code, stderr_tail=stderr_tail)
            return
        kind, message = error or (
            Kind.KERNEL_EXITED,
            "the kernel exited with code %s during start" % code,
        )
        self.emit(Event.ERROR, kind=kind, message=message, code=code, stderr_tail=stderr_tail)
