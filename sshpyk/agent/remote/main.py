"""The agent's entry point: the first request line decides what this process is.

- ``hello``: a new agent (agent.py), serving this channel's stdio;
- ``attach``: a relay from this channel's stdio to a running agent's control socket
  (a reattach after a dropped connection, ``sshpyk attach``);
- ``node``: the node side of a batch kernel, on its execution host (node.py).

Remote Python >= 3.8; nothing beyond the standard library, except the remote
environment's ``jupyter_core``/``jupyter_client``, used to find kernelspecs.
"""

import os
import signal
import socket
import sys
import threading

from .agent import Agent
from .jsonlines import decode, stdout_output
from .paths import as_int, peer_credentials, private_dir_problem, trusted_json
from .procgroup import CLEANING
from .protocol import FIRST_OPS, PROTOCOL, AgentError, Event, Kind, Op


def attach(path, output):
    """Attach mode: pipe this channel's stdio to a running agent's control socket.

    Only to an agent of this user: the socket's dir must be a private dir of ours and
    the peer (SO_PEERCRED) our uid and, if its agent.json says, that pid; else an error
    ``unsafe_path``."""
    uid = os.getuid()
    path = str(path)
    directory = os.path.dirname(path)
    record = trusted_json(directory, "agent.json", uid)
    try:
        problem = private_dir_problem(os.lstat(directory), uid)
    except OSError:
        problem = None  # gone: the connect below says so
    if problem:
        output.emit(
            Event.ERROR,
            kind=Kind.UNSAFE_PATH,
            message="not attaching to %s: its directory %s" % (path, problem),
        )
        return 1
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        output.emit(
            Event.ERROR, kind=Kind.AGENT_GONE, message="no agent listens on %s: %s" % (path, exc)
        )
        return 1
    creds = peer_credentials(conn)
    want_pid = as_int(record[0].get("pid")) if record else 0
    if creds is not None and (
        creds[1] != uid or (want_pid > 1 and creds[0] is not None and creds[0] != want_pid)
    ):
        conn.close()
        output.emit(
            Event.ERROR,
            kind=Kind.UNSAFE_PATH,
            message="not attaching to %s: it is served by pid %s of uid %d, not by your agent"
            % (path, creds[0], creds[1]),
        )
        return 1
    done = threading.Event()

    def upstream():
        stdin = sys.stdin.buffer
        while True:  # ends at the channel's EOF
            data = stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(1)
            if not data:
                break
            conn.sendall(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.set()

    def downstream():
        out = sys.stdout.buffer
        while True:  # ends when the agent closes the socket
            data = conn.recv(65536)
            if not data:
                break
            out.write(data)
            out.flush()
        done.set()

    for target in (upstream, downstream):
        threading.Thread(target=target, daemon=True).start()
    done.wait()
    return 0


def main():
    output = stdout_output()
    first = decode(sys.stdin.buffer.readline())
    if first is None:
        output.emit(
            Event.ERROR, kind=Kind.PROTOCOL, message="the first line was not a JSON request"
        )
        return 2
    if first.get("v") != PROTOCOL or first.get("op") not in FIRST_OPS:
        output.emit(
            Event.ERROR,
            kind=Kind.PROTOCOL,
            message="protocol version %r not supported (remote speaks %d)"
            % (first.get("v"), PROTOCOL),
        )
        return 2
    if first.get("op") == Op.ATTACH:
        return attach(first["socket"], output)
    if first.get("op") == Op.NODE:
        try:
            # the execution host gets every module (see batch.py); a login host's agent
            # has it only once a batch launcher is loaded
            from . import node
        except ImportError as exc:
            output.emit(Event.ERROR, kind=Kind.PROTOCOL, message="no node side: %s" % exc)
            return 1
        try:
            return node.run_node(first, output)
        except AgentError as exc:
            output.emit(Event.ERROR, kind=exc.kind, message=exc.message)
            return 1
    agent = Agent(first)
    try:
        agent.run()
        return 0
    except AgentError as exc:
        output.emit(Event.ERROR, kind=exc.kind, message=exc.message)
        return 1
    finally:
        agent.cleanup()


def _on_term(*_):
    """The first SIGTERM unwinds (main()'s finally cleans up); later ones are ignored."""
    if CLEANING.is_set():
        return
    CLEANING.set()
    sys.exit(143)


def run():
    """What the loader calls: main(), then exit the process."""
    # SIGTERM unwinds through main()'s finally, which cleans up every kernel. SIGHUP is
    # ignored: a lost connection is noticed through EOF and heartbeats, and the agent
    # keeps the kernels for the grace period so that the local side can reattach.
    # A SIGTERM during that cleanup is ignored: unwinding out of it would leave the
    # agent dir or kernels behind.
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        status = main()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    # Daemon threads may still block in reads; a normal interpreter exit would then
    # abort on the stdin buffer lock. Everything is flushed and cleaned.
    try:
        sys.stdout.flush()
    finally:
        os._exit(status)
