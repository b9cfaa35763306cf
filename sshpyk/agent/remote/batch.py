"""What every batch scheduler's launcher shares, login host side: each kernel holds an
allocation (a job, kept across the kernel's restarts: batchjobs.py) and runs as a step
in it; on the execution host the same modules run in node mode (node.py). A
scheduler's module subclasses :class:`BatchKernel`. Sent on demand (a ``load``
request before the launcher's first request), with relay.py, node.py, batchjobs.py and
the scheduler's module: agents that only run direct kernels never compile them.

The step's stdio carries the JSON control lines: every module and the ``node`` request
(with the HMAC key and the relay secret) go to the node on its stdin, then ``signal``
and ``stop`` requests; the node's events come back on its stdout. The kernel on the
node binds private sockets only (ipc in its 0700 run dir, or tcp on 127.0.0.1); its
channels reach the login host over the authenticated node connection (relay.py), and
here five unix sockets in the 0700 run dir: seen from here an ipc kernel.
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

from .batchjobs import (
    COMMAND_TIMEOUT,
    GONE_WAIT,
    POLL,
    annotate_jobs,
    hold,
    kill_job_record,
    take_held,
)
from .direct import MAX_IPC_PREFIX, tail
from .jsonlines import encode, read_messages
from .kernelspecs import find_kernelspec, kernel_argv
from .launcher import Launcher
from .loader import encode_bundle, own_sources
from .paths import private_run_dir, remove_tree
from .procgroup import TERM_WAIT, stop_group, wait_exit
from .protocol import CHANNELS, LOADER, PROTOCOL, AgentError, Event, Kind, Op
from .relay import RelaySockets


class BatchKernel(RelaySockets, Launcher):
    """A kernel run as a batch job: a step of its allocation started here on the login
    host, the kernel on an execution host, where the same modules run in node mode.

    A subclass is one scheduler: :attr:`scheduler`, :meth:`submit` and
    :meth:`await_allocation` (the allocation), :attr:`step_program`,
    :meth:`step_command` and :meth:`step_env` (a step in it), and the classmethods
    :meth:`command`, :meth:`jobs`, :meth:`job_by_name`, :meth:`cancel`,
    :meth:`terminate_job`, :meth:`probe` and :meth:`node_facts` (on the node).

    Signals never go to the step's client (a scheduler may act on them itself): an
    interrupt travels as a ``signal`` line over its stdin and the node side signals
    the kernel's process group, exactly what the direct launcher does. On the node the
    kernel is the node side's child, with JPY_PARENT_PID set to it: ipykernel's
    ParentPollerUnix exits the kernel when its parent changes.
    """

    polls_ready = False
    #: a job can outlive its step's client (a SIGKILLed one): the sweep cancels it
    sweep_kills = True
    #: the scheduler's name in messages
    scheduler = ""
    #: the command that shows the cluster's state, named in the queue timeout's error
    status_command = ""
    #: the scheduler's command that starts a step in the allocation
    step_program = ""
    #: the line the step's command prints before it reads its stdin, if the scheduler
    #: loses stdin that comes before its task runs (then nothing is written before it)
    step_greeting = None  # type: str | None

    def __init__(self, agent, request):
        Launcher.__init__(self, agent, request)
        #: the allocation the kernel runs in (kept across restarts, see Allocation)
        self.allocation = None
        #: the kernel's job step in the allocation (self.proc: the holder, or the step)
        self.step = None
        self.job_id = None
        self.job_name = "sshpyk-" + str(self.kid)[:8]
        self.node = None
        self.host = None
        self.job_state = "SUBMITTING"
        self.reason = ""
        self.submitted = time.monotonic()
        self.running_since = None
        self.node_error = None
        self.finished = threading.Event()
        self.stdout_done = threading.Event()
        self.stdout_greeted = threading.Event()
        self.stdin_queue = queue.Queue()
        #: the node connection (a relayio.Relay), once up (relay.py)
        self.mux = None
        self.relay_future = None
        self.io = None
        self.relay_secret = os.urandom(32)
        self.node_ready = False  # the node side says the kernel's sockets are bound
        #: where the five relay sockets are (the run dir, or a shorter one if it is long)
        self.socket_dir = None
        self.listeners = []  # the relay sockets' servers, on the event loop
        self.port_servers = {}  # web port -> its relay socket's server (serve_ports)
        self.cwd = None
        self.step_path = None  # where step_program is

    # -- a scheduler's part --------------------------------------------------------------
    def submit(self, args, env):
        """Ask for the allocation with the job arguments ``args``: an Allocation whose
        holder runs (its job id may come later). AgentError if it cannot be asked."""
        raise NotImplementedError

    def await_allocation(self, log):
        """In the ``allocate`` thread: wait until :attr:`allocation` is granted (True)
        or will never be (False: it was refused, or its holder ended), setting its
        ``job_id`` (and :meth:`write_info`) once known; ``log``: the binary file the
        scheduler's messages go to. Ends when :attr:`finished` is set too."""
        raise NotImplementedError

    def step_command(self, program):
        """The command (a list, :attr:`step_path` first) that runs ``program`` (a
        list: the remote python and the loader) as a step of :attr:`allocation`, its
        stdio the step's."""
        raise NotImplementedError

    def step_env(self):
        """What the step's command needs in its environment. Default: nothing."""
        return {}

    @classmethod
    def command(cls, argv, timeout=COMMAND_TIMEOUT):
        """Run one of the scheduler's commands (see :func:`scheduler_command`)."""
        raise NotImplementedError

    @classmethod
    def jobs(cls, job_ids):
        """{job id: {state, reason, node, time_left}} for the jobs the scheduler still
        lists (state: PENDING, RUNNING, ...; time_left: seconds or None)."""
        raise NotImplementedError

    @classmethod
    def job_by_name(cls, name):
        """The id of this user's newest job called ``name``, or None."""
        return None

    @classmethod
    def cancel(cls, job_id, wait=GONE_WAIT):
        """End a job unless it ended already, then wait (bounded) until it is gone."""
        raise NotImplementedError

    @classmethod
    def terminate_job(cls, info):
        """For ``kill``: ask the scheduler to TERM the processes of a record's job (the
        node side then stops the kernel and removes its run dir): True if asked.
        Default: False (the step's group is TERMed)."""
        return False

    @classmethod
    def node_facts(cls):
        """On the node (node.py): where the kernel runs, from the scheduler's
        environment: {node, job_id, step_id, launch_addr (the login host's address,
        or None)}."""
        raise NotImplementedError

    # -- helpers for schedulers ------------------------------------------------------------
    @classmethod
    def program(cls, name):
        """The path of the scheduler's command ``name``; AgentError if missing."""
        return shutil.which(name) or cls.command([name])[1]  # command raises "missing"

    # -- the agent's contract ----------------------------------------------------------------
    def state(self):
        state = Launcher.state(self)
        state.update(host=self.host, job_id=self.job_id, node=self.node)
        state[self.name + "_state"] = self.job_state
        state[self.name + "_reason"] = self.reason
        return state

    def connection_info(self):
        """An ipc kernel on the relay sockets, with the launch request's key."""
        request = self.request
        if self.running_since is None:
            raise AgentError(Kind.NOT_FOUND, "kernel %s has not started yet" % self.kid)
        info = {
            "transport": "ipc",
            "ip": os.path.join(self.socket_dir, "k"),
            "key": request["key"],
            "signature_scheme": request.get("signature_scheme", "hmac-sha256"),
            "kernel_name": request["kernel_name"],
        }
        info.update((channel + "_port", n) for n, channel in enumerate(CHANNELS, start=1))
        return info

    def launch(self):
        request = self.request
        sources = own_sources(__package__)
        if not sources or "node" not in sources:
            raise AgentError(Kind.LAUNCH_FAILED, "the agent does not have its own source")
        spec = find_kernelspec(request["kernel_name"])
        self.step_path = self.program(self.step_program)  # or: the clear "missing" error
        cwd = os.path.expanduser(request.get("cwd") or "~")
        if not os.path.isdir(cwd):
            raise AgentError(Kind.LAUNCH_FAILED, "remote working directory %r does not exist" % cwd)
        self.cwd = cwd
        self.run_dir = private_run_dir(self.agent.run_root, self.kid)
        # the scheduler's words (why a job did not run): "srun.log"
        self.log_path = os.path.join(self.run_dir, self.step_program + ".log")
        # Seen from here the kernel is an ipc kernel: five unix sockets, bound once the
        # node is ready, relayed to the node side (see "the relay"; the run dir is 0700).
        self.transport = "ipc"
        self.socket_dir = self.run_dir
        if len(os.path.join(self.socket_dir, "k")) > MAX_IPC_PREFIX:
            self.socket_dir = private_run_dir(None, self.kid)  # a long --remote-run-root
            if len(os.path.join(self.socket_dir, "k")) > MAX_IPC_PREFIX:
                raise AgentError(
                    Kind.LAUNCH_FAILED,
                    "no directory short enough for unix sockets (%s)" % self.socket_dir,
                )
        self.endpoints = dict(
            (channel, os.path.join(self.socket_dir, "k-%d" % n))
            for n, channel in enumerate(CHANNELS, start=1)
        )
        argv = kernel_argv(spec, "{connection_file}")
        env = dict(spec.get("env") or {})
        env.update(request.get("env") or {})
        self.node_request = {
            "v": PROTOCOL,
            "op": Op.NODE,
            "launcher": self.name,
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
            "auto_forward": bool(request.get("auto_forward", True)),
        }
        self.submitted = time.monotonic()
        held = take_held(self.kid)
        if held is not None and held.alive():
            # a restart: a new job step in the allocation the kernel already holds
            self.allocation, self.job_id = held, held.job_id
            self.proc = self._start_step()
        else:
            args = request.get(self.name + "_args") or []
            # SSHPYK_RUN_DIR: `sshpyk kill` and the sweep verify the holder's pid by it
            env = dict(os.environ, SSHPYK_RUN_DIR=self.run_dir, SSHPYK_KERNEL_ID=self.kid)
            self.allocation = self.submit([str(a) for a in args], env)
            self.proc = self.allocation.proc
        self.describe(
            argv,
            job_name=self.job_name,
            socket_dir=self.socket_dir if self.socket_dir != self.run_dir else None,
            **{self.name + "_args": request.get(self.name + "_args") or []},
        )
        if self.step is None:
            threading.Thread(target=self._allocate, name="allocate", daemon=True).start()
        self.emit_started(argv, spec, {}, job_name=self.job_name)
        # after "started": the local side learns of the kernel before its queue events
        if held is not None:
            # the log says whether the restart stayed in the allocation or asked anew
            self.emit(
                Event.JOB,
                job_id=held.job_id,
                state="RUNNING" if self.allocation is held else "ENDED",
                allocation="reused" if self.allocation is held else "ended",
            )
            if self.allocation is not held:
                self.agent.spawn(held.release)
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()

    def _allocate(self):
        """Wait for the allocation (the scheduler's part), then start the kernel's step."""
        allocation = self.allocation
        granted = False
        try:
            with open(self.log_path, "ab") as log:
                granted = self.await_allocation(log)
        except (OSError, ValueError):
            pass
        except Exception as exc:  # a bug: said, rather than a start that hangs
            self.node_error = (Kind.INTERNAL, "waiting for the job failed: %r" % exc)
        if granted:
            with self._cleanup_lock:
                if not (self.cleaned or self.finished.is_set()):
                    try:
                        self._start_step()
                        return
                    except AgentError as exc:
                        self.node_error = (exc.kind, exc.message)
                    except Exception as exc:
                        self.node_error = (Kind.INTERNAL, "starting the step failed: %r" % exc)
        # no allocation (revoked, rejected, cancelled) or no step: the holder ends
        allocation.release()
        code = allocation.proc.poll()
        self.agent.events.put(("exit", (self.kid, -1 if code is None else code)))

    def _start_step(self):
        """The kernel's job step in the allocation, its stdio the JSON control lines."""
        command = self.step_command([sys.executable, "-c", LOADER])
        # SSHPYK_RUN_DIR: `sshpyk kill` and the sweep verify the step's pid by it
        env = dict(os.environ, SSHPYK_RUN_DIR=self.run_dir, SSHPYK_KERNEL_ID=self.kid)
        env.update(self.step_env())
        try:
            self.step = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise AgentError(
                Kind.LAUNCH_FAILED, "cannot start %s: %s" % (command[0], exc)
            ) from None
        if self.step_greeting is None:
            self.stdout_greeted.set()
        # every module (the node runs them too), then the node request (with the key)
        self.stdin_queue.put(encode_bundle(own_sources(__package__)) + encode(self.node_request))
        for target in (self._write_stdin, self._read_stdout, self._read_stderr, self._wait):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        return self.step

    def write_info(self):
        """sshpyk.json on the login host, with where the job runs."""
        self.info.update(job_id=self.job_id, node=self.node, host=self.host)
        Launcher.write_info(self)

    # -- the step's stdio (threads) ------------------------------------------------------------
    def send(self, message):
        """A request to the node, as a JSON line on the step's stdin."""
        self.stdin_queue.put(encode(message))

    def _on_json(self, event):
        self.agent.events.put(("event", (self.kid, event)))

    def _write_stdin(self):
        stdin = self.step.stdin
        self.stdout_greeted.wait()  # set at once, or by the greeting (or stdout's end)
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
        """The greeting (if any), then the node's JSON events, until stdout ends."""
        try:
            if self.step_greeting is not None:
                self.step.stdout.readline()  # the task runs: its stdin reaches it now
                self.stdout_greeted.set()
            read_messages(self.step.stdout, self._on_json)
        finally:
            self.stdout_greeted.set()
            self.stdout_done.set()

    def _read_stderr(self):
        try:
            with open(self.log_path, "ab") as log:
                for line in iter(self.step.stderr.readline, b""):
                    log.write(line)
                    log.flush()
        except (OSError, ValueError):
            pass

    def _wait(self):
        self.stdout_done.wait()  # the node's last events are queued before the exit
        code = self.step.wait()
        self.agent.events.put(("exit", (self.kid, code)))

    # -- the queue, the time limit (a thread) ------------------------------------------
    def _poll_job(self):
        if self.job_id is None and time.monotonic() - self.submitted > POLL:
            found = self.job_by_name(self.job_name)  # the scheduler did not say
            if found and self.job_id is None:
                self.job_id = found
                self.write_info()
        if self.job_id is None:
            return None
        return self.jobs([self.job_id]).get(str(self.job_id))

    def _monitor(self):
        request = self.request
        interval = max(1.0, float(request.get(self.name + "_status_interval") or 30.0))
        queue_timeout = float(request.get(self.name + "_queue_timeout") or 600.0)
        lead = float(request.get(self.name + "_walltime_warning") or 0.0)
        reported_at, reported = None, None
        while not self.finished.is_set() and self.running_since is None:
            try:
                job = self._poll_job()
            except AgentError:
                job = None
            waited = time.monotonic() - self.submitted
            if self.running_since is not None:
                break
            if job is not None:
                self.job_state, self.reason = job["state"], job["reason"]
                now = time.monotonic()
                if (job["state"], job["reason"]) != reported or now - reported_at >= interval:
                    reported, reported_at = (job["state"], job["reason"]), now
                    self.emit(
                        Event.JOB,
                        job_id=self.job_id,
                        state=job["state"],
                        reason=job["reason"],
                        waited=round(waited, 1),
                    )
            if waited >= queue_timeout:
                if self.job_id:
                    what = "%s job %s was still %s after %gs%s" % (
                        self.scheduler,
                        self.job_id,
                        (self.job_state or "pending").lower(),
                        queue_timeout,
                        " (reason: %s)" % self.reason if self.reason else "",
                    )
                else:
                    what = "the %s job was not started within %gs" % (self.scheduler, queue_timeout)
                # the local side appends " on '<alias>'"
                what += ", so it was cancelled: raise --%s-queue-timeout, or see `%s`" % (
                    self.name,
                    self.status_command,
                )
                self.agent.events.put(("fail", (self.kid, self.name + "_queue_timeout", what)))
                return
            self.finished.wait(min(POLL, max(0.05, queue_timeout - waited)))
        # running: warn once, `lead` seconds ahead of the time limit
        while lead > 0 and not self.finished.is_set():
            try:
                job = self._poll_job()
            except AgentError:
                job = None
            if job is None or job["time_left"] is None:
                return  # no time limit, or the scheduler cannot tell
            due = job["time_left"] - lead
            if due > 0:
                self.finished.wait(min(due, 600.0))  # then ask again: limits can change
                continue
            self.emit(
                Event.JOB,
                job_id=self.job_id,
                state=job["state"],
                node=self.node,
                time_left=job["time_left"],
                warning="walltime",
            )
            return

    # -- events from the node (on the agent's loop) --------------------------------------
    def on_event(self, event):
        kind = event.get("event")
        if kind == "node":
            self.running_since = time.monotonic()
            self.job_id = str(event.get("job_id") or self.job_id or "") or None
            self.node = event.get("node")
            self.host = event.get("host")  # the node side's relay listener
            self.job_state, self.reason = "RUNNING", ""
            self.write_info()
            self.emit(
                Event.JOB,
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
            if port and not self.cleaned:
                self.start_relay(event.get("host"), port)
        elif kind in ("ready", "relay_up"):
            # the node probed the kernel's sockets and the relay is up (both, in either
            # order): bind ours, then tell the local side
            if kind == "ready":
                self.node_ready = True
            if self.node_ready and self.mux is not None and not self.ready:
                if self.exit_code is None and self.listen():
                    self.ready = True
                    self.emit(Event.READY)
                else:
                    self.agent.spawn(self.cleanup)
        elif kind == "ports":
            if not self.cleaned and self.exit_code is None:
                self.set_ports(self.serve_ports(event.get("ports")))
        elif kind == "relay_failed":
            self.agent.spawn(self.cleanup)
        elif kind == "exited":
            if self.exit_code is None:
                self.on_exit(int(event.get("code", -1)), str(event.get("stderr_tail") or ""))
        elif kind == "error":
            self.node_error = (str(event.get("kind") or "launch_failed"), event.get("message"))

    def on_exit(self, code, stderr_tail=None):
        self.exit_code = code
        self.finished.set()
        if stderr_tail is None:
            stderr_tail = tail(self.log_path)  # the scheduler's words: why it did not run
        if self.ready:
            self.emit(Event.EXITED, code=code, stderr_tail=stderr_tail)
        else:
            if self.node_error is not None:
                kind, message = self.node_error
            elif self.running_since is None:
                kind = self.name + "_failed"
                message = "the %s job%s ended before the kernel ran (exit code %s)" % (
                    self.scheduler,
                    " " + self.job_id if self.job_id else "",
                    code,
                )
            else:
                kind = Kind.KERNEL_EXITED
                message = "the kernel exited with code %s during start (%s job %s on %s)" % (
                    code,
                    self.scheduler,
                    self.job_id,
                    self.node,
                )
            self.emit(Event.ERROR, kind=kind, message=message, code=code, stderr_tail=stderr_tail)
        # the job ends with its step; reap what is left off the loop (a cancel is slow)
        self.agent.spawn(self.cleanup)

    def signal(self, signum):
        if self.exit_code is not None or self.proc is None:
            return
        if self.step is None and signum not in (signal.SIGTERM, signal.SIGKILL):
            return  # not started yet
        if self.running_since is not None:
            self.send({"op": "signal", "signum": int(signum)})
        elif signum in (signal.SIGTERM, signal.SIGKILL):
            # not running yet: give up the queued job, off the loop (a cancel is slow)
            self.agent.spawn(self.cleanup)

    def _cleanup(self):
        """Stop the kernel on the node and its step; then hold the allocation for the
        next launch of this kernel id (a restart: ``keep_allocation``) or release it
        (cancelled: nothing left in the queue); remove the run dir."""
        self.finished.set()
        step = self.step
        if step is not None:
            if step.poll() is None and self.running_since is not None:
                self.send({"op": Op.STOP})  # the node side TERMs, then KILLs the kernel
                self.stdin_queue.put(None)
                wait_exit(step, TERM_WAIT + 5)
            stop_group(step.pid, step, term_wait=5.0, kill_wait=2.0)
            self.stdin_queue.put(None)
        self.close_relay()
        allocation = self.allocation
        if allocation is not None:
            # a restart follows a stop with keep_allocation, and often an exit (the
            # kernel died, or the allocation ended: the next launch says so)
            keep = self.keep_allocation or (
                self.keep_allocation is None and self.exit_code is not None
            )
            if keep and allocation.job_id and step is not None:
                hold(self.kid, allocation)
            else:
                allocation.release()
        if self.socket_dir and self.socket_dir != self.run_dir:
            remove_tree(self.socket_dir)
        self.remove_run_dir()

    def cleanup(self):
        Launcher.cleanup(self)
        if self.keep_allocation is False:  # a plain stop: nothing held for this kid
            held = take_held(self.kid)
            if held is not None:
                held.release()

    def start_failed(self):
        return Launcher.start_failed(self) and self.running_since is None

    # -- records of this launcher's kernels (workers) ----------------------------------------
    @classmethod
    def annotate(cls, records):
        """The scheduler's state of each kernel's job (one query)."""
        return annotate_jobs(cls, records)

    @classmethod
    def kill_record(cls, info, verified_pid):
        """TERM the job's processes (the node side removes its run dir, with the key),
        stop the step's group, cancel the job (see batchjobs.kill_job_record)."""
        return kill_job_record(cls, info, verified_pid, Launcher.kill_record.__func__)
