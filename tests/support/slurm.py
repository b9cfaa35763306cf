"""A throwaway single-node SLURM cluster for tests: munged, slurmctld and slurmd as root,
without systemd, everything (config, keys, state, logs, sockets) in one directory.

Debian's slurm-wlm (22.05) and munge; ``scripts/setup`` installs them. Clients need
``SLURM_CONF`` (see :meth:`ThrowawaySlurm.env`); munge's socket is private to the
cluster (``AuthInfo=socket=...``), so nothing touches /etc or /run. ``python -m
tests.support.slurm`` runs one in the foreground.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .sshd import free_port, stop_process

__all__ = ["ThrowawaySlurm", "slurm_missing"]

#: what the cluster needs, by path or name on PATH
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "srun", "squeue", "scontrol", "scancel")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in _SBIN:
        path = os.path.join(directory, tool)
        if os.access(path, os.X_OK):
            return path
    return None


def slurm_missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        return (
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "scripts/setup installs slurm-wlm and munge"
        )
    if os.geteuid() != 0:
        return "the throwaway SLURM cluster runs slurmd as root: run the tests as root"
    return None


def _alive(proc: subprocess.Popen[bytes] | None) -> bool:
    """Via /proc: PID 1 here reaps slowly, a zombie still answers kill -0."""
    if proc is None or proc.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][:1] != "Z"


class ThrowawaySlurm:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, cpus: int = 8) -> None:
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="sshpyk-slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> ThrowawaySlurm:
        why = slurm_missing()
        if why:
            raise RuntimeError(why)
        deadline = time.monotonic() + timeout
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        # munged refuses a socket directory that is not 0755
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            self._run_checked("mungekey", "--create", "--keyfile", str(key))
        (self.root / "plugstack.conf").write_text("")  # no SPANK plugins
        self._spawn(
            "munged",
            [
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), deadline, "munged")
        self.conf.write_text(self.config_text(free_port(), free_port()))
        self._spawn("slurmctld", ["-D", "-c", "-f", str(self.conf)])
        self._wait(self._controller_up, deadline, "slurmctld")
        self._spawn("slurmd", ["-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: self.node_state() == "idle", deadline, "slurmd")
        return self

    def config_text(self, ctld_port: int, slurmd_port: int) -> str:
        root = self.root
        return f"""ClusterName=sshpyktest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
PlugStackConfig={root / "plugstack.conf"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
MpiDefault=none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def stop(self) -> None:
        if self.procs.get("slurmctld") is not None and _alive(self.procs["slurmctld"]):
            self.run("scancel", f"--user={os.getuid()}")  # nothing outlives the cluster
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                stop_process(proc, grace=10)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawaySlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def pre_command(self) -> str:
        """For a kernelspec: what makes the agent's SLURM commands find this cluster."""
        return f"export SLURM_CONF={self.conf}"

    def run(self, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        tool = _which(argv[0]) or argv[0]
        return subprocess.run(
            [tool, *argv[1:]],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def jobs(self) -> list[dict[str, str]]:
        """Every job squeue lists (pending, running, completing): id, state, reason, node."""
        out = self.run("squeue", "-h", "-o", "%i|%T|%r|%N").stdout
        jobs = []
        for line in out.splitlines():
            job_id, state, reason, node = line.split("|")
            jobs.append({"job_id": job_id, "state": state, "reason": reason, "node": node})
        return jobs

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%t").stdout.strip()

    def drain(self, reason: str = "test") -> None:
        self._run_checked(
            "scontrol", "update", f"nodename={self.node}", "state=drain", f"reason={reason}"
        )

    def resume(self) -> None:
        self._run_checked("scontrol", "update", f"nodename={self.node}", "state=resume")
        deadline = time.monotonic() + 10
        self._wait(lambda: self.node_state() in ("idle", "mix", "alloc"), deadline, "resume")

    # -- helpers ----------------------------------------------------------------------
    def _controller_up(self) -> bool:
        return "is UP" in self.run("scontrol", "ping").stdout

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / "log" / f"{name}.out", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [str(_which(name)), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )

    def _wait(self, ready: object, deadline: float, what: str) -> None:
        assert callable(ready)
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self.procs.items():
                if not _alive(proc):
                    raise RuntimeError(f"{name} exited while starting: {self._log_tail(name)}")
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not come up in time: {self._log_tail(what)}")

    def _log_tail(self, name: str) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-1500:])
        return " | ".join(" ".join(t.split()) for t in texts) or "(no log)"

    def _run_checked(self, *argv: str) -> None:
        done = self.run(*argv)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {(done.stderr or done.stdout).strip()}")


if __name__ == "__main__":
    with ThrowawaySlurm() as cluster:
        print(f"SLURM up: export SLURM_CONF={cluster.conf}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)
