"""The node side of a batch kernel, inside its job step on the execution host.

The scheduler's step (batch.py) runs the remote python there with the same loader as
the agent's; every module arrives on its stdin, then the ``node`` request. The node
side starts the kernel in a private 0700 run dir on the node, on private sockets only
(ipc in the run dir if the kernel supports it, else tcp on 127.0.0.1: never an address
other hosts reach), and serves the login host's one authenticated node connection
(relay.py) on the process's event loop (relayio.py). The step's stdio carries the JSON
control lines: its events go to stdout, ``signal`` and ``stop`` requests come on its
stdin, whose EOF (the agent or the step's client is gone) ends it. Where it runs (node,
job id) the request's launcher reads from its scheduler's environment
(``node_facts``). Threads: this loop, the event loop, stdin's reader and the kernel's
waiter.
"""

import asyncio
import os
import queue
import signal
import socket
import sys
import threading

from .direct import endpoints_bound, pick_transport, spawn_kernel, tail, write_connection_file
from .jsonlines import read_messages
from .launcher import launcher_class
from .paths import private_run_dir, remove_tree
from .ports import PortScanner
from .procgroup import CLEANING, stop_group
from .protocol import AgentError, Event, Kind, Op
from .relay import RELAY_CONNECT_TIMEOUT, serve_node
from .relayio import io_loop

#: seconds the way out waits for the event loop to close the node connection
_CLOSE_WAIT = 2.0


def node_address(launch):
    """This node's address as the login host reaches it: the local end of the route to
    ``launch`` (the login host's address, if the scheduler says; connecting a UDP
    socket sends nothing), else the address of the node's name."""
    launch = launch or ""
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


def _set_web(web, ports):
    """On the event loop (where the relay reads it): the kernel's web ports now."""
    web.clear()
    web.update(ports)


def run_node(request, output):
    """Node mode, inside the batch job's step: start one kernel on private sockets,
    report on stdout, obey stdin (``signal``, ``stop``; EOF means the agent or the
    step's client is gone), and relay the login host's connections to the kernel (see
    "the relay"). Always stops the kernel's process group and removes the run dir on
    the way out."""
    facts = launcher_class(request.get("launcher") or "?").node_facts()
    # The kernel inherits ignored signals but not handlers: ignore SIGINT (a
    # scheduler's signal to the job reaches every process of the step) through a handler.
    signal.signal(signal.SIGINT, lambda *_: None)
    events = queue.Queue()
    run_dir = private_run_dir(request.get("run_root"), request["kid"])
    proc = None
    mux = None
    listener = None
    serving = None
    io = io_loop()
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

        # the relay's listener: on the address the login node reaches, for one
        # authenticated connection (see "the relay"), closed once it is made
        secret = bytes.fromhex(str(request.get("relay_secret") or ""))
        if len(secret) < 16:
            raise AgentError(Kind.LAUNCH_FAILED, "the node request has no relay secret")
        host = node_address(facts.get("launch_addr"))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((host, 0))
            listener.listen(8)
        except OSError:
            listener.close()
            raise
        output.emit(
            Event.NODE,
            pid=proc.pid,
            host=host,
            relay_port=listener.getsockname()[1],
            transport=transport,
            run_dir=run_dir,
            node=facts.get("node") or socket.gethostname(),
            job_id=facts.get("job_id"),
            step_id=facts.get("step_id"),
        )

        # the kernel's web ports (ports.py), reachable through the node connection as
        # streams "tcp:<port>" (never on the cluster network); port -> host
        web = {}

        def target(channel):
            if channel.startswith("tcp:"):
                port = int(channel[4:])
                return (web[port], port)  # KeyError: not a port of the kernel's
            return endpoints[channel]

        serving = asyncio.run_coroutine_threadsafe(
            serve_node(
                listener,
                secret,
                target,
                lambda relay: events.put(("relay", relay)),
                lambda: events.put(("eof", None)),  # the login side is gone (or stops us)
            ),
            io.loop,
        )

        def read_stdin():
            read_messages(sys.stdin.buffer, lambda msg: events.put(("msg", msg)))
            events.put(("eof", None))  # the step's stdin ended

        def wait_kernel():
            events.put(("exit", proc.wait()))

        for target in (read_stdin, wait_kernel):
            threading.Thread(target=target, daemon=True).start()
        ready = False
        bound = set()  # sockets seen accepting, see endpoints_bound
        scanner = PortScanner() if request.get("auto_forward", True) else None
        own = set(p for p in endpoints.values() if isinstance(p, int))
        reported = []
        while True:  # ends with the kernel, a stop request, or the step's stdin
            try:
                kind, value = events.get(timeout=1.0 if ready else 0.01)
            except queue.Empty:
                kind, value = None, None
            if kind == "exit":
                output.emit(Event.EXITED, code=value, stderr_tail=tail(log_path))
                return 0
            if kind == "eof" or (kind == "msg" and value.get("op") == Op.STOP):
                return 0
            if kind == "relay":
                if value is None:
                    output.emit(
                        Event.ERROR,
                        kind=Kind.LAUNCH_FAILED,
                        message="the login node did not connect to the node side of the "
                        "kernel (on %s) within %gs: does a firewall stand between them?"
                        % (host, RELAY_CONNECT_TIMEOUT),
                    )
                    return 1
                mux = value
            if kind == "msg" and value.get("op") == Op.SIGNAL:
                try:
                    os.killpg(proc.pid, int(value["signum"]))
                except (ProcessLookupError, PermissionError, KeyError, ValueError):
                    pass
            if ready and scanner is not None:
                ports = scanner.scan({"k": (proc.pid, run_dir, own)}).get("k", [])
                if ports != reported:
                    reported = ports
                    io.call(_set_web, web, dict((p["port"], p["host"]) for p in ports))
                    output.emit(Event.PORTS, ports=ports)
            if (
                not ready
                and mux is not None
                and endpoints_bound(transport, endpoints, "127.0.0.1", bound)
            ):
                ready = True
                output.emit(Event.READY)
    finally:
        CLEANING.set()  # a TERM from the scheduler (cancel, time limit) no longer cuts this short
        if serving is not None:
            serving.cancel()  # an accept still waiting: it closes the listener
        elif listener is not None:
            listener.close()

        async def close():
            if mux is not None:
                mux.close()

        try:
            io.run(close(), _CLOSE_WAIT)
        except Exception:
            pass  # bounded: what is left ends with the process
        # the key first: a scheduler SIGKILLs the step soon after its TERM (a time limit)
        remove_tree(run_dir)
        if proc is not None:
            stop_group(proc.pid, proc)
        remove_tree(run_dir)  # what the kernel wrote while it stopped
