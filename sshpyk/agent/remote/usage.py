"""What each kernel costs, for ``ps`` (``usage`` requests): CPU, resident memory and
GPU of the kernel's whole process tree. Linux only (/proc); elsewhere the fields are
None. Nothing runs unless a ``ps`` asks: the agent keeps no timer for it.

The rules (README's ``sshpyk ps`` says them too):

- A kernel's processes: its session (every kernel leads a session of its own, see
  direct.spawn_kernel) and every descendant of its pid (a child that left the session
  with setsid is still the kernel's), found in ONE pass over /proc/PID/stat for all
  kernels at once (a few µs per process on the host).
- ``cpu_percent``: the CPU time (user + system, and that of reaped children) the tree
  used over the last ``cpu_window_s`` seconds, 100 = one core busy (as ``top``). An
  agent remembers its last sample of each kernel: the next ``ps`` within MAX_AGE
  seconds measures since then; otherwise it samples twice, WINDOW seconds apart (a
  ``ps`` of a fresh agent takes WINDOW longer).
- ``rss_bytes``: the sum of the tree's resident sets (/proc/PID/stat's rss, as
  statm's resident). Pages shared by several processes (a forked worker's
  copy-on-write memory, shared libraries) count in each: an upper bound. PSS
  (smaps_rollup) would be exact but makes the kernel walk every page table, too dear
  to ask every second.
- ``gpu``: when nvidia-smi is on PATH, one entry per GPU the tree's processes hold
  memory on (``--query-compute-apps``): ``used_memory_bytes``, the tree's on that GPU;
  ``utilization_percent``, that GPU's as a whole (``--query-gpu``: NVIDIA reports no
  per-process share cheaply), so kernels sharing a GPU each show the GPU's load (None
  where nvidia-smi has none: ``[N/A]``, e.g. a GPU split into MIG instances). None
  without nvidia-smi or when it fails; [] when the kernel holds no GPU. nvidia-smi
  runs at most once per GPU_PERIOD for all kernels (never per kernel), bounded by
  NVIDIA_SMI_TIMEOUT (one that does not die when killed, on a wedged GPU, is left
  behind: a failure); "not on PATH" is remembered, a failure for FAILED_BACKOFF
  seconds. Its pids are those of its pid namespace: in a container they may not match.
"""

import os
import shutil
import subprocess
import threading
import time

from .procgroup import ABANDON_WAIT, run_bounded
from .records import record_launcher

#: seconds between the two samples of a kernel the agent has no recent sample of
WINDOW = 1.0
#: a sample older than this is no baseline (the CPU % would cover too long a time)
MAX_AGE = 10.0
#: a ``ps`` sooner than this after the last sample repeats its CPU % (too short a window)
MIN_WINDOW = 0.5
#: processes read per sample at most, and seconds one pass over /proc may take
MAX_PROCESSES = 100000
SCAN_BUDGET = 2.0
#: seconds an nvidia-smi answer is reused; its time limit; how long a failure is believed
GPU_PERIOD = 2.0
NVIDIA_SMI_TIMEOUT = 5.0
FAILED_BACKOFF = 60.0
#: what is asked of nvidia-smi (CSV with its header: the parser goes by the header)
COMPUTE_APPS_QUERY = ("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv")
GPU_QUERY = ("--query-gpu=index,uuid,utilization.gpu,memory.used,memory.total", "--format=csv")

_MIB = 1 << 20


def _sysconf(name, default):
    try:
        return os.sysconf(name) or default
    except (ValueError, OSError, AttributeError):
        return default


CLOCK_TICKS = _sysconf("SC_CLK_TCK", 100)
PAGE_SIZE = _sysconf("SC_PAGE_SIZE", 4096)


# -- /proc ------------------------------------------------------------------------------
def read_processes(proc="/proc", limit=MAX_PROCESSES, budget=SCAN_BUDGET):
    """{pid: (ppid, session, ticks, rss_pages)} of the processes in ``proc`` (those that
    end meanwhile are left out), ``ticks``: utime + stime + cutime + cstime. At most
    ``limit`` processes and ``budget`` seconds. None where there is no /proc."""
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    found = {}
    deadline = time.monotonic() + budget
    for name in names[: limit * 2]:  # bounded: /proc also holds a few dozen other names
        if not name.isdigit():
            continue
        if len(found) >= limit or time.monotonic() > deadline:
            break
        try:
            with open("%s/%s/stat" % (proc, name), "rb") as f:
                data = f.read(4096)
            fields = data.rsplit(b") ", 1)[1].split()
            found[int(name)] = (
                int(fields[1]),
                int(fields[3]),
                int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14]),
                int(fields[21]),
            )
        except (OSError, IndexError, ValueError):
            continue  # it ended, or a line we cannot read
    return found


def process_trees(pids, processes):
    """{pid: the pids of its tree} among ``processes`` (read_processes): the members of
    its session (if it leads one), itself, and their descendants."""
    children = {}
    sessions = {}
    for p, info in processes.items():
        children.setdefault(info[0], []).append(p)
        sessions.setdefault(info[1], []).append(p)
    trees = {}
    for pid in pids:
        members = set(sessions.get(pid, ()))
        if pid in processes:
            members.add(pid)
        todo = list(members)
        while todo:  # bounded: each process is added once
            for child in children.get(todo.pop(), ()):
                if child not in members:
                    members.add(child)
                    todo.append(child)
        trees[pid] = members
    return trees


# -- nvidia-smi -------------------------------------------------------------------------
NOT_AVAILABLE = ("[n/a]", "n/a", "[not supported]", "[unknown error]", "[insufficient permissions]")


def _field_name(header):
    """``used_gpu_memory [MiB]`` -> (``used_gpu_memory``, ``mib``)."""
    name, _, unit = header.strip().partition(" [")
    return name.strip().lower(), unit.rstrip("]").strip().lower()


def parse_csv(text):
    """The rows of nvidia-smi's ``--format=csv`` output (the first line its header;
    ``noheader`` is not supported) as dicts keyed by field name without its unit; the
    values stripped, None where nvidia-smi says it has none (``[N/A]``, ``[Not
    Supported]``). Each value keeps its header's unit: (value, unit). Lines that are
    not rows (``No running processes found``, blank ones, a row with a field count
    unlike the header's) are left out."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return []
    fields = [_field_name(h) for h in lines[0].split(",")]
    rows = []
    for line in lines[1:]:
        values = [v.strip() for v in line.split(",")]
        if len(values) != len(fields):
            continue
        row = {}
        for (name, unit), value in zip(fields, values):
            row[name] = (None if value.lower() in NOT_AVAILABLE else value, unit)
        rows.append(row)
    return rows


def _number(cell):
    """A cell of parse_csv as (a float, its unit: its own or else its header's), None
    when it has none (``3864 MiB`` and, with ``nounits``, ``3864`` alike)."""
    if cell is None or cell[0] is None:
        return None
    parts = cell[0].split()
    try:
        return float(parts[0]), (parts[1] if len(parts) > 1 else cell[1]).lower()
    except (ValueError, IndexError):
        return None


def _float(cell):
    number = _number(cell)
    return number[0] if number is not None else None


def _bytes(cell):
    number = _number(cell)
    if number is None:
        return None
    scale = {"b": 1, "kib": 1 << 10, "mib": _MIB, "gib": 1 << 30}.get(number[1], _MIB)
    return int(number[0] * scale)


def parse_compute_apps(text):
    """``--query-compute-apps`` (pid, gpu_uuid, used_memory) -> [(pid, uuid or None,
    bytes or None)]."""
    apps = []
    for row in parse_csv(text):
        pid = _float(row.get("pid"))
        if pid is None:
            continue
        uuid = (row.get("gpu_uuid") or (None, ""))[0]
        memory = row.get("used_gpu_memory") or row.get("used_memory")
        apps.append((int(pid), uuid, _bytes(memory)))
    return apps


def parse_gpus(text):
    """``--query-gpu`` (index, uuid, utilization.gpu, ...) -> {uuid: {"index",
    "uuid", "utilization_percent", "memory_used_bytes", "memory_total_bytes"}}."""
    gpus = {}
    for row in parse_csv(text):
        uuid = (row.get("uuid") or (None, ""))[0]
        index = _float(row.get("index"))
        if uuid is None:
            continue
        gpus[uuid] = {
            "index": int(index) if index is not None else None,
            "uuid": uuid,
            "utilization_percent": _float(row.get("utilization.gpu")),
            "memory_used_bytes": _bytes(row.get("memory.used")),
            "memory_total_bytes": _bytes(row.get("memory.total")),
        }
    return gpus


def kernel_gpus(pids, apps, gpus):
    """The ``gpu`` field of a kernel whose processes are ``pids``: one entry per GPU its
    processes hold memory on, sorted by index (see the module's rules). An app without
    a uuid (an older query) is on the only GPU, if there is one."""
    only = next(iter(gpus)) if len(gpus) == 1 else None
    held = {}
    for pid, uuid, memory in apps:
        if pid not in pids:
            continue
        uuid = uuid or only
        entry = held.get(uuid)
        if entry is None:
            gpu = gpus.get(uuid) or {}
            entry = held[uuid] = {
                "index": gpu.get("index"),
                "uuid": uuid,
                "used_memory_bytes": None,
                "utilization_percent": gpu.get("utilization_percent"),
            }
        if memory is not None:
            entry["used_memory_bytes"] = (entry["used_memory_bytes"] or 0) + memory
    return sorted(held.values(), key=lambda g: (g["index"] is None, g["index"] or 0))


class NvidiaSmi:
    """nvidia-smi, asked at most once per GPU_PERIOD (both queries), in the caller's
    thread (a worker's), never under a lock: each query is bounded (procgroup.run_bounded:
    NVIDIA_SMI_TIMEOUT, then a kill and ABANDON_WAIT; one that cannot die, on a wedged
    GPU, is left behind and counts as a failure). A ``ps`` that comes while another
    asks waits for that answer (bounded) instead of asking again."""

    def __init__(self, command="nvidia-smi"):
        self.command = command
        self.path = False  # not looked up yet; None: not on PATH (for good)
        self.at = -1e9
        self.answer = None
        self.failed_at = -1e9
        self.cond = threading.Condition()
        self.asking = False

    def _run(self, args):
        out, problem = run_bounded([self.path, *args], NVIDIA_SMI_TIMEOUT)
        if problem is not None:
            raise subprocess.SubprocessError(problem)
        return out

    def sample(self, wanted_pids):
        """(apps, gpus) as parsed, or None (no nvidia-smi, or it failed lately). The GPU
        query is skipped while no process of ``wanted_pids`` holds a GPU."""
        with self.cond:
            if self.path is False:
                self.path = shutil.which(self.command)
            if self.path is None:
                return None
            deadline = time.monotonic() + 2 * (NVIDIA_SMI_TIMEOUT + ABANDON_WAIT) + 1.0
            while self.asking:  # another ps asks: its answer will do (ends by deadline)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            now = time.monotonic()
            if now - self.failed_at < FAILED_BACKOFF:
                return None
            if self.answer is not None and now - self.at < GPU_PERIOD:
                apps, gpus = self.answer
                if gpus is not None or not any(a[0] in wanted_pids for a in apps):
                    return apps, gpus or {}
            self.asking = True
        answer = None
        try:
            apps = parse_compute_apps(self._run(COMPUTE_APPS_QUERY))
            gpus = None
            if any(pid in wanted_pids for pid, _, _ in apps):
                gpus = parse_gpus(self._run(GPU_QUERY))
            answer = (apps, gpus)
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            with self.cond:
                self.asking = False
                if answer is None:
                    self.failed_at, self.answer = now, None
                else:
                    self.at, self.answer = now, answer
                self.cond.notify_all()
        return (answer[0], answer[1] or {}) if answer is not None else None


# -- the sampler ------------------------------------------------------------------------
class Usage:
    """One agent's memory of its samples (thread safe: ``ps`` runs in workers). The lock
    guards that memory only: never held while waiting for the second sample nor while
    nvidia-smi runs, so a ``ps`` never waits long for another."""

    def __init__(self, proc="/proc", nvidia_smi=None):
        self.proc = proc
        self.nvidia_smi = nvidia_smi or NvidiaSmi()
        self.lock = threading.Lock()
        #: (run_dir, pid) -> (monotonic time, ticks, cpu_percent, window)
        self.last = {}

    def annotate(self, kernels, wait=time.sleep):
        """Add ``cpu_percent``, ``cpu_window_s``, ``rss_bytes`` and ``gpu`` to the
        records of ``kernels`` (None where not known: a dead kernel, one whose launcher
        runs it elsewhere, no /proc). May take WINDOW seconds (see the module's rules)."""
        targets = {}
        for info in kernels:
            info.update(cpu_percent=None, cpu_window_s=None, rss_bytes=None, gpu=None)
            launcher = record_launcher(info)
            pid = info.get("pid")
            if info.get("alive") and launcher is not None and launcher.runs_here:
                if isinstance(pid, int) and pid > 1:
                    targets[(info.get("run_dir"), pid)] = info
        if not targets:
            return kernels
        self._measure(targets, wait)
        return kernels

    def _measure(self, targets, wait):
        processes = read_processes(self.proc)
        if processes is None:
            return
        now = time.monotonic()
        with self.lock:
            stale = [k for k in targets if now - self.last.get(k, (-1e9,))[0] > MAX_AGE]
            if stale:  # no recent baseline: take one now, measure WINDOW later
                trees = process_trees([pid for _, pid in stale], processes)
                for key in stale:
                    ticks = sum(processes[p][2] for p in trees[key[1]])
                    self.last[key] = (now, ticks, None, None)
            # a baseline without a CPU % yet (ours, or another ps's): WINDOW after it
            due = max([self.last[k][0] + WINDOW for k in targets if self.last[k][2] is None] or [0])
        if due > now:
            wait(due - now)  # bounded by WINDOW; without the lock
            processes = read_processes(self.proc) or {}
            now = time.monotonic()
        trees = process_trees([pid for _, pid in targets], processes)
        with self.lock:
            for key, info in targets.items():
                tree = trees[key[1]]
                ticks = sum(processes[p][2] for p in tree)
                info["rss_bytes"] = sum(processes[p][3] for p in tree) * PAGE_SIZE
                at, before, cpu, window = self.last.get(key) or (now, ticks, None, None)
                if cpu is None or now - at >= MIN_WINDOW:
                    if now - at > 0:  # not when another ps measured after this one read
                        window = now - at
                        cpu = 100.0 * max(0, ticks - before) / CLOCK_TICKS / window
                        self.last[key] = (now, ticks, cpu, window)
                info["cpu_percent"] = round(cpu, 1) if cpu is not None else None
                info["cpu_window_s"] = round(window, 2) if cpu is not None else None
            for key in [k for k, v in self.last.items() if now - v[0] > 3 * MAX_AGE]:
                del self.last[key]  # bounded: kernels nobody asked about lately are forgotten
        gpu = self.nvidia_smi.sample(set().union(*trees.values()))
        if gpu is not None:
            apps, gpus = gpu
            for key, info in targets.items():
                info["gpu"] = kernel_gpus(trees[key[1]], apps, gpus)
