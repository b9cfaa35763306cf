"""A throwaway single-node Son of Grid Engine for tests: the qmaster and an execd as
root on this host (loopback), without systemd.

Debian's gridengine-master, gridengine-exec and gridengine-client (``scripts/setup``
installs them with the debconf answers below). Unlike SLURM, Grid Engine keeps its
cell in one place (``$SGE_ROOT/$SGE_CELL``, /var/lib/gridengine/default, spooled in
/var/spool/gridengine): :meth:`ThrowawaySGE.start` configures that cell for a test
cluster (root may run jobs, a one-second scheduler, a parallel environment ``smp``
whose tasks the job controls, a checkpoint environment ``keep`` so that a task's
death does not kill its job, the queue ``all.q`` on this host) and :meth:`stop` stops
both daemons, deleting every job first. ``python -m tests.support.sge`` runs one in
the foreground. The facts this relies on are in /work/shared/notes/gridengine.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["SGE_ARGS", "ThrowawaySGE", "sge_missing"]

SGE_ROOT = Path("/var/lib/gridengine")
SGE_CELL = "default"
COMMON = SGE_ROOT / SGE_CELL / "common"
QMASTER_PID = Path("/var/spool/gridengine/qmaster/qmaster.pid")
EXECD_PID = Path("/var/run/gridengine/execd.pid")
#: what the tests' kernelspecs ask for: one slot of the tightly integrated environment
SGE_ARGS = "-pe smp 1"
TOOLS = ("sge_qmaster", "sge_execd", "qconf", "qsub", "qrsh", "qstat", "qdel")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
#: the debconf answers the packages need to configure a cell at install time
PRESEED = (
    "gridengine-common shared/gridengineconfig boolean true",
    "gridengine-common shared/gridenginecell string default",
    "gridengine-common shared/gridenginemaster string {host}",
)


def _which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in _SBIN:
        path = os.path.join(directory, tool)
        if os.access(path, os.X_OK):
            return path
    return None


def sge_missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    missing = [t for t in TOOLS if _which(t) is None]
    if missing:
        return (
            f"Grid Engine is not installed ({', '.join(missing)} missing): scripts/setup "
            "installs gridengine-master, gridengine-exec and gridengine-client"
        )
    if os.geteuid() != 0:
        return "the throwaway Grid Engine runs its execd as root: run the tests as root"
    if not (COMMON / "bootstrap").exists():
        return f"Grid Engine has no configured cell ({COMMON}/bootstrap is missing)"
    return None


def _pid(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int) -> bool:
    if pid <= 1:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][:1] != "Z"


class ThrowawaySGE:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self, *, slots: int = 4) -> None:
        self.node = socket.gethostname()
        self.slots = slots
        self.work = Path(tempfile.mkdtemp(prefix="sshpyk-sge-"))

    # -- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> ThrowawaySGE:
        why = sge_missing()
        if why:
            raise RuntimeError(why)
        deadline = time.monotonic() + timeout
        self._stop_daemons()  # a cell left running by an interrupted run
        self._names()
        self._daemon("gridengine-master", "start")
        self._wait(lambda: self.run("qconf", "-sh").returncode == 0, deadline, "sge_qmaster")
        self._configure()
        self._daemon("gridengine-exec", "start")
        self._wait(self._queue_up, deadline, "sge_execd")
        return self

    def stop(self) -> None:
        if _alive(_pid(QMASTER_PID)):
            self.run("qdel", "-f", "-u", "*")  # nothing outlives the cluster
            deadline = time.monotonic() + 15
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.2)
        self._stop_daemons()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> ThrowawaySGE:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        return {**os.environ, "SGE_ROOT": str(SGE_ROOT), "SGE_CELL": SGE_CELL}

    @property
    def pre_command(self) -> str:
        """For a kernelspec: what makes the agent's Grid Engine commands find the cell."""
        return f"export SGE_ROOT={SGE_ROOT} SGE_CELL={SGE_CELL}"

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
        """Every job qstat lists (pending, running, deleting): id, state, queue."""
        done = self.run("qstat", "-u", "*", "-xml")
        if done.returncode != 0:
            return []
        jobs = []
        for job in ET.fromstring(done.stdout).iter("job_list"):
            jobs.append(
                {
                    "job_id": job.findtext("JB_job_number") or "",
                    "state": job.findtext("state") or "",
                    "queue": job.findtext("queue_name") or "",
                    "name": job.findtext("JB_name") or "",
                }
            )
        return jobs

    def disable(self) -> None:
        """No new job starts (the queue is disabled; running ones go on)."""
        self._checked("qmod", "-d", "all.q")

    def enable(self) -> None:
        self._checked("qmod", "-e", "all.q")

    # -- helpers ----------------------------------------------------------------------
    def _names(self) -> None:
        """The qmaster must know this host by the name its clients resolve to."""
        arch = self.run(str(SGE_ROOT / "util" / "arch")).stdout.strip() or "lx-amd64"
        resolve = SGE_ROOT / "utilbin" / arch / "gethostbyaddr"
        address = socket.gethostbyname(self.node)
        reverse = subprocess.run(
            [str(resolve), "-name", address], capture_output=True, text=True, check=False
        ).stdout.strip()
        aliases = COMMON / "host_aliases"
        if reverse and reverse != self.node:
            aliases.write_text(f"{self.node} {reverse}\n")
        elif aliases.exists():
            aliases.unlink()
        (COMMON / "act_qmaster").write_text(self.node + "\n")

    def _configure(self) -> None:
        """Root may run jobs; a fast scheduler; the PE, the ckpt and the queue."""
        conf = self.run("qconf", "-sconf", "global").stdout
        # -Mconf reads the configuration named like its file
        self._modify("-Mconf", conf, {"min_uid": "0", "min_gid": "0"}, name="global")
        self._checked("qconf", "-as", self.node)
        sched = self.run("qconf", "-ssconf").stdout
        self._modify(
            "-Msconf",
            sched,
            {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1"},
        )
        pe = {
            "pe_name": "smp",
            "slots": "9999",
            "user_lists": "NONE",
            "xuser_lists": "NONE",
            "start_proc_args": "NONE",
            "stop_proc_args": "NONE",
            "allocation_rule": "$pe_slots",
            "control_slaves": "TRUE",
            "job_is_first_task": "FALSE",
            "urgency_slots": "min",
            "accounting_summary": "FALSE",
            "qsort_args": "NONE",
        }
        self._define("p", "smp", pe)  # qconf -Ap, -Mp, -spl
        ckpt = {
            "ckpt_name": "keep",
            "interface": "userdefined",
            "ckpt_command": "NONE",
            "migr_command": "NONE",
            "restart_command": "NONE",
            "clean_command": "NONE",
            "ckpt_dir": "/tmp",
            "signal": "NONE",
            "when": "r",
        }
        self._define("ckpt", "keep", ckpt)
        exists = "all.q" in self.run("qconf", "-sql").stdout.split()
        # the queue's own configuration, or qconf's template for a new one
        queue = self.run("qconf", "-sq", *(["all.q"] if exists else [])).stdout
        values = {
            "qname": "all.q",
            "hostlist": self.node,
            "slots": str(self.slots),
            "pe_list": "smp",
            "ckpt_list": "keep",
            "load_thresholds": "NONE",
            "shell": "/bin/bash",
        }
        self._modify("-Mq" if exists else "-Aq", queue, values)

    def _define(self, kind: str, name: str, values: dict[str, str]) -> None:
        """Add (or replace) a parallel (``p``) or checkpoint (``ckpt``) environment."""
        listed = self.run("qconf", f"-s{kind}l").stdout.split()
        path = self.work / f"{kind}-{name}"
        path.write_text("".join(f"{k} {v}\n" for k, v in values.items()))
        self._checked("qconf", f"-M{kind}" if name in listed else f"-A{kind}", str(path))

    def _modify(self, flag: str, text: str, values: dict[str, str], name: str = "") -> None:
        lines = []
        for line in text.splitlines():
            key = line.split(None, 1)[0] if line.strip() else ""
            lines.append(f"{key} {values.pop(key)}" if key in values else line)
        lines += [f"{k} {v}" for k, v in values.items()]
        path = self.work / (name or flag.strip("-"))
        path.write_text("\n".join(lines) + "\n")
        self._checked("qconf", flag, str(path))

    def _queue_up(self) -> bool:
        """The execd reports and the queue instance takes jobs (no a/u/E state)."""
        out = self.run("qstat", "-f", "-q", f"all.q@{self.node}").stdout
        for line in out.splitlines():
            if line.startswith("all.q@"):
                parts = line.split()
                return len(parts) < 6 and parts[-1] != "-NA-"
        return False

    def _daemon(self, name: str, action: str) -> None:
        done = subprocess.run(
            [f"/etc/init.d/{name}", action],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} {action} failed: {(done.stderr or done.stdout).strip()}")

    def _stop_daemons(self) -> None:
        """TERM the execd, then the qmaster (4-10 s); KILL what is left after 20 s."""
        for pid_file in (EXECD_PID, QMASTER_PID):
            pid = _pid(pid_file)
            if not _alive(pid):
                continue
            os.kill(pid, 15)
            deadline = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, 9)

    def _wait(self, ready: object, deadline: float, what: str) -> None:
        assert callable(ready)
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up in time: {self._messages()}")

    def _messages(self) -> str:
        logs = [Path("/var/spool/gridengine/qmaster/messages")]
        logs += list(Path("/var/spool/gridengine/execd").glob("*/messages"))
        tails = [p.read_text(errors="replace")[-800:] for p in logs if p.exists()]
        return " | ".join(" ".join(t.split()) for t in tails) or "(no messages)"

    def _checked(self, *argv: str) -> None:
        done = self.run(*argv)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")


if __name__ == "__main__":
    with ThrowawaySGE() as cluster:
        print(f"Grid Engine up: {cluster.pre_command}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            sys.exit(0)
