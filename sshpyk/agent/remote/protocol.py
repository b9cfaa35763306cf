"""The agent protocol: its version, op and event names, the kernel's channels and the
error kinds, defined once. Both sides use this module: the local side imports it
(``sshpyk.agent.remote.protocol``), and it is sent to the remote with the agent.

JSON lines, every line carries ``"v": PROTOCOL``. local -> agent (stdin), the first line
opens the conversation, either starting an agent or relaying to a running one through
its control socket (reattach after a dropped connection)::

    {"v": 1, "op": "hello", "grace": 60.0, "run_root": null}
    {"v": 1, "op": "attach", "socket": "/tmp/sshpyk-agent-.../agent.sock"}

then any of (``kid`` is the kernel id, ``rid`` a request id)::

    {"op": "ping"}                                  # heartbeat from the local side
    {"op": "inspect", "rid": 1, "kernel_name": "python3"}
    {"op": "launch", "kid": ..., "kernel_name": ..., "key": ..., "signature_scheme": ...,
     "transport": "auto|ipc|tcp", "env": {...}, "cwd": ...,
     "launcher": "direct|<name>", ...}             # and the launcher's own options
    {"op": "signal", "kid": ..., "signum": 2}       # to the kernel's process group
    {"op": "stop", "kid": ...}                      # kill the group, remove its run dir
    {"op": "state", "rid": 1}                       # every kernel: pid, ready, exit code
    {"op": "connection_info", "rid": 1, "kid": ...} # for a local side that reattaches
    {"op": "ps", "rid": 1, "run_root": null, "all_users": false,
     "usage": false}                                # sshpyk kernels here (usage: CPU...)
    {"op": "client", "kid": ..., "client": "attach"}  # who drives the kernel now
    {"op": "kill", "rid": 1, "kernel_id": ...|null, "orphans": false, "run_root": null,
     "all_users": false}                            # all_users: root only
    {"op": "shutdown", "rid": 1, "keep_persistent": false}  # the local side leaves
    {"op": "load", "rid": 1, "name": <launcher>, "modules": {name: source}}  # once
    {"op": "probe", "rid": 1, "launcher": <name>, "args": [...]}  # can it run here?
    {"op": "discover", "rid": 1, "roots": [...], "search_only": false, "limit": 30}

agent -> local (stdout)::

    {"event": "hello", "pid", "python", "python_version", "jupyter_client", "socket"}
    {"event": "info", "rid", "kernelspec": {...}}
    {"event": "started", "kid", "pid", "pgid", "run_dir", "transport", "endpoints"}
    {"event": "job", "kid", "job_id", "state", ...}  # a batch job: queue, node, walltime
    {"event": "ready", "kid"}                       # all five sockets are bound
    {"event": "exited", "kid", "code", "stderr_tail"}  # + "reason": "idle_timeout",
                                                    # "idle_s", "idle_timeout" (idle.py)
    {"event": "stopped", "kid"}                     # process group dead, run dir gone
    {"event": "state"|"connection_info"|"loaded"|"probe", "rid", ...}
    {"event": "ps", "rid", "kernels": [{..., "uid", "user", "alive", "agent_alive",
     "attached", "agent_socket", "last_contact", "run_dir", "client"[, "cpu_percent",
     "cpu_window_s", "rss_bytes", "gpu"]}]}       # usage: see usage.py
    {"event": "killed", "rid", "kernels": [{..., "killed": true|false, "error": null|"..."}]}
    {"event": "bye", "rid", "kept"}                 # answer to shutdown
    {"event": "discovered", "rid", "pythons", "skipped", "warnings", "elapsed"}  # discover.py
    {"event": "error", "kid"|"rid", "kind", "message"}  # KINDS, or a launcher's own

The local side and the agent are always the same version (the agent's code is sent),
but the first line's version is still checked: a mismatch is a ``protocol`` error.

How the code travels: the remote python runs ``LOADER`` (``python -c LOADER``), which
reads a decimal length line and then that many bytes of JSON, ``{module: source}`` in
dependency order (see ``loader.py``), installs them as the package ``PACKAGE`` and runs
``main.run()``. A launcher's modules (a batch scheduler's) follow on demand in a
``load`` request; an execution host gets every module the same way, through the job
step's stdin. The agent's own start sends only the loader and the bundle's hash: the
loader takes the compiled bundle from the user's cache on the host, or asks for it
(``need_code``) and caches it (``loader.boot``).
"""

PROTOCOL = 1

#: the kernel's five ZMQ channels, in connection-file order (ipc ports 1..5)
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")

#: the package the modules are installed as on the remote host (see loader.py)
PACKAGE = "sshpyk_agent"

#: what ``python -c`` runs on the remote host: it stays short, it is in the command line
LOADER = (
    "import sys,json;r=sys.stdin.buffer;B=json.loads(r.read(int(r.readline())));"
    "g={'__name__':'sshpyk_agent_loader'};exec(B['loader'],g);g['boot'](B,r).main.run()"
)


class Op:
    """Requests (the ``op`` of a line to the agent)."""

    HELLO = "hello"
    ATTACH = "attach"
    NODE = "node"  # the first line on an execution host, see node.py
    PING = "ping"
    INSPECT = "inspect"
    LAUNCH = "launch"
    SIGNAL = "signal"
    STOP = "stop"
    STATE = "state"
    CONNECTION_INFO = "connection_info"
    PS = "ps"
    KILL = "kill"
    SHUTDOWN = "shutdown"
    LOAD = "load"
    #: can the launcher run kernels here (its ``probe``: a scheduler's commands, and
    #: whether it takes the job arguments)
    PROBE = "probe"
    #: the local side says where it forwards a kernel's web ports (``ps`` shows it)
    FORWARDED = "forwarded"
    #: who drives a kernel now (``sshpyk attach`` took it over): ``ps`` shows it
    CLIENT = "client"
    #: the first message of a local process on the control socket: who it is (owners.py)
    CLAIM = "claim"
    #: a last will: the local process ``owner`` exited (owners.py), not contact
    GONE = "gone"
    #: the host's Pythons with jupyter_client and their kernelspecs (discover.py)
    DISCOVER = "discover"


#: the ops a conversation may start with
FIRST_OPS = (Op.HELLO, Op.ATTACH, Op.NODE)


class Event:
    """Events (the ``event`` of a line from the agent)."""

    HELLO = "hello"
    INFO = "info"
    STARTED = "started"
    #: a batch kernel's job: its queue state, where it runs, its walltime warning
    JOB = "job"
    READY = "ready"
    EXITED = "exited"
    STOPPED = "stopped"
    STATE = "state"
    CONNECTION_INFO = "connection_info"
    PS = "ps"
    KILLED = "killed"
    BYE = "bye"
    LOADED = "loaded"
    PROBE = "probe"
    DISCOVERED = "discovered"
    ERROR = "error"
    NODE = "node"  # the node side: the kernel runs, its relay listens
    #: the TCP listeners of a kernel's processes changed (ports.py): the whole list
    PORTS = "ports"
    #: from the loader, before the hello: the agent's code is not in the host's cache,
    #: send the bundle (loader.py)
    NEED_CODE = "need_code"


#: the ``reason`` of an ``exited`` event whose kernel the agent shut down because it was
#: idle for the launch request's ``idle_timeout`` seconds (see idle.py)
IDLE_TIMEOUT = "idle_timeout"


class Kind:
    """Error kinds (the ``kind`` of an ``error`` event); the local side maps each to a
    class of its exception tree."""

    PROTOCOL = "protocol"
    INTERNAL = "internal"
    JUPYTER_CLIENT_MISSING = "jupyter_client_missing"
    KERNELSPEC_NOT_FOUND = "kernelspec_not_found"
    LAUNCH_FAILED = "launch_failed"
    KERNEL_EXITED = "kernel_exited"
    NOT_FOUND = "not_found"
    #: a run root, run dir or agent socket another user could steer
    UNSAFE_PATH = "unsafe_path"
    #: all_users without root
    NOT_PERMITTED = "not_permitted"
    #: attach: no agent listens on the socket any more
    AGENT_GONE = "agent_gone"
    #: a discover while another runs in the same agent (one at a time)
    BUSY = "busy"
    # a launcher's own kinds are its modules' (a batch scheduler's: batch.py)


KINDS = frozenset(v for k, v in vars(Kind).items() if not k.startswith("_"))


class AgentError(Exception):
    """A request failed: ``kind`` (one of KINDS, or a launcher's own) and a one-line
    ``message``, sent to the local side as an ``error`` event."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message
