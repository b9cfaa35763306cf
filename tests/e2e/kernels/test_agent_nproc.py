"""64 kernels through one agent under a low ``ulimit -u`` (RLIMIT_NPROC), as on HPC login
nodes that cap a user's processes and threads together at a few hundred.

The remote user is a throwaway unprivileged one (RLIMIT_NPROC does not bind root),
created like support/second_user.py's but with a login shell and an unlocked account, so that
it can log in to its own throwaway OpenSSH sshd (tests/support/sshd.py) on 127.0.0.1 with
root's test key (a ``Match User`` block points sshd at an authorized_keys file that user
can read). It runs the kernels with a Python it may execute: the test interpreter when
it can, else a ``--without-pip`` venv under /tmp on a system Python of the same version
whose .pth file adds the test environment's site-packages. The kernelspec's
pre-command ``ulimit -u NPROC`` runs in the remote login shell just before it execs the
agent's Python, so the limit binds the agent and every kernel it starts; the count it
is checked against is all tasks (processes and threads) of that user: the agent, the
kernels, and sshd's session process for that user.

Root's side is the usual one: one SSHSession, so one agent, 64 RemoteKernels started 8
at a time, an AsyncKernelClient on each (all channels; kernel_info via
wait_for_ready), then ``1+1`` executed on each of the 64 while all are connected. Then
everything is shut down and no process of the user may be left.

How NPROC was found: the user's tasks (the sum of /proc/PID/task over its processes)
with 64 kernels up, connected and each after its execute, without a limit (2-core test
VM; remote Python 3.11.2 with ipykernel 7.4, IPython 9.18, pyzmq 27.3; OpenSSH 9.2):

* f615df6 (a reader and a writer thread per relay stream, two per link, and workers):
  1732 tasks in 66 processes: the agent's 899 threads, 64 kernels x 13 threads = 832,
  and sshd's session process. About 27 tasks per kernel, 14 of them the agent's.
* an agent with <= 8 threads at 64 kernels: 832 + 8 + 1 = 841 tasks at most. The
  one-event-loop agent of issue 20 (fb8e814 and the work after it, as of 16d0631):
  837 tasks, the agent's 4 threads; it passes under ``ulimit -u 1200`` in about 18 s.
* the limit binds nothing else: on f615df6, 32 kernels (868 tasks, the agent 451
  threads) pass under ``ulimit -u 1200``; the count's peak while starting (sampled
  every 0.1 s) was the count when all were up.

NPROC = 1200 lies well between: on f615df6 the user runs out of tasks at kernel 43 to
46 of 64 (six runs); the kernel starting then dies for want of a thread (e.g.
``KernelStartError: the kernel exited with code -6 ...; kernel output: Resource
temporarily unavailable (src/thread.cpp:241)`` or ``Kernel died before replying to
kernel_info``) and the message shows ~1190 tasks of which the agent holds ~620 threads.
An agent with <= 8 threads passes with a margin of 359 tasks (43%). The test takes
about 20 s when it passes, 15 to 20 s when it fails on f615df6.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import pwd
import secrets
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sshpyk import SSHSession
from sshpyk.kernels.kernel import KernelOptions, RemoteKernel

from support.second_user import SecondUser, _remove
from support.sshd import ThrowawaySSHD, find_sshd
from support.waiting import pid_alive, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KERNELS = 64
#: RLIMIT_NPROC of the remote user (see the module docstring for how it was found)
NPROC = 1200
#: kernels started at once (64 ipykernels take about a minute of CPU on 2 cores)
CONCURRENCY = 8
#: one kernel's start, its client's kernel_info, one execute: each bounded by this
STEP_TIMEOUT = 120.0
SHELL = "/bin/bash"


# -- the remote user, its Python and its sshd --------------------------------------------


@dataclass
class Remote:
    user: SecondUser
    python: str
    run_root: Path
    alias: str
    ssh_config: Path

    def tasks(self) -> tuple[int, int]:
        """(processes, tasks) of the user now: its threads and processes together, what
        RLIMIT_NPROC counts."""
        procs = tasks = 0
        for pid in self.user.pids():
            with contextlib.suppress(OSError):
                tasks += len(os.listdir(f"/proc/{pid}/task"))
                procs += 1
        return procs, tasks


@contextlib.contextmanager
def login_user(home: Path) -> Iterator[SecondUser]:
    """A brand-new unprivileged user with a login shell, an unlocked account (sshd
    without PAM refuses keys for a locked, ``!``-password account) and ``home`` (the
    kernels' working directory); removed at the end with every process it has."""
    if os.geteuid() != 0:
        pytest.skip("needs root: RLIMIT_NPROC binds only a second, unprivileged user")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel:
        pytest.skip("useradd/userdel are not installed (apt-get install passwd)")
    if not os.access(SHELL, os.X_OK):
        pytest.skip(f"{SHELL} is missing (the remote user's login shell)")
    name = f"sshpyk-nproc-{secrets.token_hex(3)}"
    argv = [useradd, "--system", "--no-create-home", "--home-dir", str(home)]
    argv += ["--shell", SHELL, "--password", "*", name]
    created = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if created.returncode != 0:
        pytest.skip(f"useradd {name} failed: {created.stderr.strip()}")
    try:
        entry = pwd.getpwnam(name)
        user = SecondUser(name, entry.pw_uid, entry.pw_gid)
        home.mkdir(mode=0o700)
        user.chown(home)
        yield user
    finally:
        _remove(name, userdel)


CHECK = "import ipykernel, jupyter_client, sys; print(sys.version_info[:2] == (%d, %d))"


def _works(user: SecondUser, python: str) -> bool:
    """``python`` runs as ``user`` and imports ipykernel and jupyter_client."""
    code = CHECK % sys.version_info[:2]
    try:
        result = user.run([python, "-c", code], check=False, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and result.stdout.strip() == "True"


def _closure(names: tuple[str, ...]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``names`` need (their requirements, transitively,
    with the markers that apply here)."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo and len(seen) < 500:  # bounded: an environment has fewer packages
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen[name] = dist
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


def _copy_packages(dest: Path) -> None:
    """Copy ipykernel, jupyter_client and what they need into ``dest`` (a site dir)."""
    for dist in _closure(("ipykernel", "jupyter_client")):
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            if ".." in file.parts or not source.is_file():
                continue  # scripts installed outside site-packages (bin/)
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def user_python(user: SecondUser, where: Path) -> str:
    """A Python with ipykernel and jupyter_client that ``user`` may execute."""
    if _works(user, sys.executable):
        return sys.executable
    # the test interpreter lives where the user cannot go (e.g. a 0700 home): a venv of a
    # system Python of the same version that sees the test environment's packages, or,
    # where those are out of its reach too, copies of the packages the kernel needs
    version = "{}.{}".format(*sys.version_info[:2])
    packages = [p for p in site.getsitepackages() if os.path.isdir(p)]
    copied = where / "site"
    for base in (f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        if not os.access(base, os.X_OK):
            continue
        for sources in ("shared", "copied"):
            venv = where / f"venv{len(list(where.glob('venv*')))}"
            made = subprocess.run(
                [base, "-m", "venv", "--without-pip", str(venv)],
                capture_output=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
            if made.returncode != 0:
                break
            if sources == "copied" and not copied.exists():
                _copy_packages(copied)
            paths = packages if sources == "shared" else [str(copied)]
            site_dir = venv / "lib" / f"python{version}" / "site-packages"
            (site_dir / "sshpyk-tests.pth").write_text("".join(p + "\n" for p in paths))
            python = str(venv / "bin" / "python")
            if _works(user, python):
                return python
    pytest.skip(
        f"no Python {version} with ipykernel that {user.name} may execute "
        f"({sys.executable} is out of its reach, no usable system python{version})"
    )


@contextlib.contextmanager
def remote_host() -> Iterator[Remote]:
    """The remote user, its Python, run root and sshd; all removed at the end."""
    if find_sshd() is None:
        pytest.skip("OpenSSH sshd is not installed (apt-get install openssh-server)")
    base = Path(tempfile.mkdtemp(prefix="sshpyk-nproc-"))
    os.chmod(base, 0o755)  # the remote user reaches its keys, Python and run root
    try:
        with login_user(base / "home") as user:
            python = user_python(user, base)
            run_root = base / "run"
            run_root.mkdir(mode=0o700)
            user.chown(run_root)
            keys = base / "user_keys"
            sshd = ThrowawaySSHD(
                base / "sshd",
                extra_sshd_config=f"Match User {user.name}\n  AuthorizedKeysFile {keys}\n",
                alias="sshpyk-nproc",
            ).start()
            try:
                keys.write_text((sshd.root / "id_ed25519.pub").read_text())
                os.chmod(keys, 0o644)
                config = base / "ssh_config"
                config.write_text(
                    f"Host {sshd.alias}\n  HostName 127.0.0.1\n  Port {sshd.port}\n"
                    f"  User {user.name}\n  IdentitiesOnly yes\n"
                    f"  IdentityFile {sshd.root / 'id_ed25519'}\n"
                    f"  UserKnownHostsFile {sshd.known_hosts}\n"
                )
                yield Remote(user, python, run_root, sshd.alias, config)
            finally:
                sshd.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- 64 kernels through one agent ----------------------------------------------------------


class KernelFailedError(Exception):
    """One kernel failed; the message says which, at what stage and how."""


@dataclass
class Served:
    kernel: RemoteKernel | None = None
    client: Any = None

    @property
    def pid(self) -> int:
        """The remote kernel's pid."""
        assert self.kernel is not None and self.kernel.process is not None
        return self.kernel.process.pid

    @property
    def agent_pid(self) -> int:
        """The pid of the agent that started it."""
        assert self.kernel is not None and self.kernel.process is not None
        return int(self.kernel.process.agent.pid or 0)


def brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:500]


async def bounded(what: str, index: int, awaitable: Any, timeout: float = STEP_TIMEOUT) -> Any:
    """``awaitable``, bounded by ``timeout``; any failure becomes :class:`KernelFailedError`."""
    started = time.monotonic()
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except Exception as exc:
        took = time.monotonic() - started
        if isinstance(exc, asyncio.TimeoutError) and took >= timeout:
            raise KernelFailedError(
                f"kernel {index} of {KERNELS}: {what} took over {timeout:g}s"
            ) from None
        raise KernelFailedError(
            f"kernel {index} of {KERNELS}: {what} failed after {took:.1f}s: {brief(exc)}"
        ) from exc


async def start_one(
    session: SSHSession, options: KernelOptions, index: int, served: Served
) -> None:
    served.kernel = await bounded("start", index, session.start_kernel(options=options))
    served.client = served.kernel.client()
    served.client.start_channels()  # shell, iopub, stdin, control, hb
    await bounded("kernel_info", index, served.client.wait_for_ready(timeout=STEP_TIMEOUT))


async def execute_one(index: int, served: Served) -> None:
    results: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "execute_result":
            results.append(msg["content"]["data"].get("text/plain", ""))

    run = served.client.execute_interactive("1+1", output_hook=hook, timeout=STEP_TIMEOUT)
    content = (await bounded("execute", index, run, STEP_TIMEOUT + 10))["content"]
    if content["status"] != "ok" or results != ["2"]:
        raise KernelFailedError(
            f"kernel {index} of {KERNELS}: 1+1 gave {content['status']} {results}"
        )


async def close_one(served: Served) -> None:
    if served.client is not None:
        served.client.stop_channels()
    if served.kernel is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(served.kernel.close(), 30)


def threads(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat): a pid reused by another
    process has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pythons(remote: Remote) -> set[int]:
    """The user's processes running its Python (the agent and the kernels)."""
    found = set()
    for pid in remote.user.pids():
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if argv0.decode() == remote.python:
                found.add(pid)
    return found


class Serving:
    """KERNELS kernels through one SSHSession, so one agent, on ``remote`` with ``ulimit
    -u limit`` as the pre-command (none with None); what was measured goes to ``note``."""

    def __init__(self, remote: Remote, limit: int | None) -> None:
        self.remote, self.limit = remote, limit
        self.options = KernelOptions(
            python=remote.python,
            pre_command=f"ulimit -u {limit}" if limit else None,
            run_root=str(remote.run_root),
            start_timeout=STEP_TIMEOUT,
        )
        self.served = [Served() for _ in range(KERNELS)]
        self.failures: list[str] = []
        self.agents: set[int] = set()
        #: the agent's start time when the first kernel was up
        self.born: str | None = None
        self.note: dict[str, Any] = {"ulimit -u": limit}

    def state(self) -> str:
        """What the user spends now, for failure messages."""
        procs, tasks = self.remote.tasks()
        agent = ", ".join(
            f"agent {pid}: {n} threads" if (n := threads(pid)) is not None else f"agent {pid} gone"
            for pid in self.agents
        )
        return (
            f"[ulimit -u {self.limit}; user {self.remote.user.name}: {procs} processes, "
            f"{tasks} tasks; {agent or 'no agent yet'}]"
        )

    def fail(self, failures: list[str]) -> None:
        if len(failures) > 1:
            more = f"; {len(failures) - 1} more failed, e.g. {failures[1]}"
            raise AssertionError(failures[0] + more)
        if failures:
            raise AssertionError(failures[0])

    async def start(self, session: SSHSession, index: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            if self.failures:
                return
            served = self.served[index - 1]
            try:
                await start_one(session, self.options, index, served)
            except KernelFailedError as exc:
                self.failures.append(f"{exc} {self.state()}")
                raise
            if not self.agents:
                self.born = start_time(served.agent_pid)
            self.agents.add(served.agent_pid)

    async def start_all(self, session: SSHSession) -> None:
        """CONCURRENCY starts at a time; at the first failure the starts in flight get
        a few seconds (to say how they fail too), then are cancelled."""
        gate = asyncio.Semaphore(CONCURRENCY)
        tasks = [asyncio.ensure_future(self.start(session, i, gate)) for i in range(1, KERNELS + 1)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            if self.failures:
                await asyncio.wait(tasks, timeout=5)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=60)
            for task in tasks:  # retrieved: no "exception was never retrieved" later
                if task.done() and not task.cancelled():
                    task.exception()
        self.fail(self.failures)

    async def run(self) -> None:
        """Start all, a client on each (kernel_info), 1+1 on each while all are
        connected; one agent throughout; shut all down. AssertionError on failure."""
        t0 = time.monotonic()
        connect = SSHSession.connect(
            self.remote.alias, ssh_config=self.remote.ssh_config, connect_timeout=30
        )
        session = await asyncio.wait_for(connect, 60)
        async with session:
            try:
                await self.start_all(session)
                self.note["started_s"] = round(time.monotonic() - t0, 1)
                assert len(self.agents) == 1, f"the kernels have agents {self.agents}"
                (agent,) = self.agents
                results = await asyncio.gather(
                    *(execute_one(i, s) for i, s in enumerate(self.served, 1)),
                    return_exceptions=True,
                )
                self.fail([f"{r} {self.state()}" for r in results if isinstance(r, Exception)])
                self.note["executed_s"] = round(time.monotonic() - t0, 1)
                self.measure(agent)
                kernels = {s.pid for s in self.served}
                assert pid_alive(agent) and start_time(agent) == self.born, (
                    f"the agent {agent} is gone {self.state()}"
                )
                assert {s.agent_pid for s in self.served} == {agent}
                assert pythons(self.remote) - kernels == {agent}, (
                    f"agents besides {agent}: {pythons(self.remote) - kernels - {agent}}"
                )
            finally:
                closing = asyncio.gather(*(close_one(s) for s in self.served))
                await asyncio.wait_for(closing, 120)
        self.note["closed_s"] = round(time.monotonic() - t0, 1)

    def measure(self, agent: int) -> None:
        procs, tasks = self.remote.tasks()
        counts = [threads(s.pid) or 0 for s in self.served]
        self.note.update(
            processes=procs,
            tasks=tasks,
            agent_threads=threads(agent),
            kernel_threads=f"{sum(counts)} ({min(counts)}-{max(counts)} each)",
        )


def test_64_kernels_under_a_low_process_limit() -> None:
    """64 kernels, each connected and executing, through one agent of a user whose
    RLIMIT_NPROC is NPROC; nothing of that user is left afterwards."""
    with remote_host() as remote:
        serving = Serving(remote, NPROC)
        asyncio.run(asyncio.wait_for(serving.run(), 540))
        print(f"{KERNELS} kernels: {serving.note}")
        assert wait_until(lambda: not remote.user.pids(), 30, 0.2), (
            f"processes of {remote.user.name} left: {remote.user.pids()}"
        )
        assert not list(remote.run_root.iterdir()), list(remote.run_root.iterdir())
