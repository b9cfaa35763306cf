"""What sshpyk left in run roots: the records of run dirs (``sshpyk.json``) and agent
dirs (``agent.json``), read only through paths.read_trusted; ``ps`` (:func:`scan`),
``kill`` (:func:`kill_run_dir`) and the stale sweep (:func:`sweep`).

A kernel pid from such a record is only signalled if the process is that kernel
(procgroup.verify_kernel_pid: its owner and its SSHPYK_RUN_DIR); an agent is alive
when its socket's peer credentials (SO_PEERCRED) are the recorded pid of our uid.
Whenever an agent starts, and at ``ps`` and ``kill``, the sweep removes this user's
dirs of dead agents and of dead kernels of dead agents, which a SIGKILLed agent
leaves behind. These functions block (probes, kills, scheduler commands): the agent
runs them in worker threads.
"""

import os
import socket
import time

from .idle import idle_seconds
from .launcher import LAUNCHERS, Launcher
from .paths import (
    as_int,
    mtime,
    peer_credentials,
    private_dir_problem,
    remove_tree,
    trusted_json,
    user_name,
)
from .procgroup import pid_alive, pid_runs_as, verify_kernel_pid
from .protocol import AgentError, Kind

#: a run dir without its record (a kernel being set up, or debris) is removed by the
#: stale sweep only when older than this and no other agent of the user runs
UNRECORDED_STALE = 3600.0
#: how long a liveness probe of an agent's control socket may take
PROBE_TIMEOUT = 0.5
#: a local side pings at least every 5 s: silence for three pings means it is gone
ATTACHED_WITHIN = 15.0


def legacy_pid_mark(info):
    """What identifies a record's pid when its environment does not: the step of a
    batch kernel recorded before steps got SSHPYK_RUN_DIR carries ``--job-name=NAME``."""
    job_name = info.get("job_name")
    return "--job-name=%s" % job_name if job_name else None


def probe_agent(socket_path, pid, uid):
    """Whether the agent ``pid`` of ``uid`` serves ``socket_path``: True or False from
    the socket's peer credentials (connection refused: False), None if that cannot be
    told (no peer credentials, or a hung agent's listen backlog is full)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(socket_path)
        creds = peer_credentials(s)
    except (socket.timeout, BlockingIOError, InterruptedError):
        return None
    except OSError:
        return False  # refused, or no socket: nobody listens there
    finally:
        s.close()
    if creds is None:
        return None
    peer_pid, peer_uid = creds
    return peer_uid == uid and (peer_pid is None or peer_pid == pid)


def scan(roots, owner):
    """The sshpyk dirs of ``owner`` (None: of every user) under ``roots`` that pass the
    checks of read_trusted: ``(kernels, agents, unrecorded)``. ``kernels``: the records
    of run dirs (sshpyk.json) with run_dir, uid, user, alive; ``agents``: ``(uid, pid)``
    -> the record of an agent dir with dir, socket, contact, alive (see probe_agent);
    ``unrecorded``: ``(path, lstat)`` of private dirs of ``owner`` without a valid
    record (being set up, or debris). Anything else under ``roots`` is ignored."""
    kernels, agents, unrecorded = [], {}, []
    for root in roots:
        try:
            entries = sorted(os.listdir(root))
        except OSError:
            continue
        for entry in entries:
            if not entry.startswith("sshpyk-"):
                continue
            path = os.path.join(root, entry)
            is_agent = entry.startswith("sshpyk-agent-")
            record = trusted_json(path, "agent.json" if is_agent else "sshpyk.json", owner)
            if record is None:
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if private_dir_problem(st, owner) is None:
                    unrecorded.append((path, st))
                continue
            info, uid = record
            if is_agent:
                pid = as_int(info.get("pid"))
                agent = {
                    "pid": pid,
                    "uid": uid,
                    "dir": path,
                    "socket": os.path.join(path, "agent.sock"),
                    "contact": mtime(os.path.join(path, "contact")),
                }
                alive = probe_agent(agent["socket"], pid, uid) if pid > 1 else False
                agent["alive"] = pid_runs_as(pid, uid) if alive is None else alive
                agents[(uid, pid)] = agent
                continue
            info["run_dir"] = path
            info["idle_s"] = idle_seconds(path)  # None: not seen (no relay)
            info["uid"] = uid
            info["user"] = user_name(uid)
            pid = as_int(info.get("pid"))
            info["alive"] = (
                pid_alive(pid) and verify_kernel_pid(pid, path, uid, legacy_pid_mark(info)) is None
            )
            kernels.append(info)
    for info in kernels:
        agent = agents.get((info["uid"], as_int(info.get("agent_pid"))))
        info["agent_alive"] = bool(agent and agent["alive"])
        info["last_contact"] = agent.get("contact") if agent else None
        info["attached"] = info["agent_alive"] and attached(agent)
        info["agent_socket"] = agent["socket"] if info["agent_alive"] else None
    return kernels, agents, unrecorded


def scan_kernels(roots, owner=-1):
    """Every sshpyk kernel run dir of ``owner`` (default: this user; None: every user)
    under ``roots`` that passes the checks, with liveness. See scan."""
    return scan(roots, os.getuid() if owner == -1 else owner)[0]


def attached(agent_info):
    """Whether a local side was heard recently (not whether the grace period is over:
    a kernel waiting out its grace already counts as an orphan for `sshpyk kill`)."""
    contact = agent_info.get("contact")
    return contact is not None and time.time() - contact <= ATTACHED_WITHIN


def record_launcher(info, launchers=None):
    """The launcher class of a record (direct for records without one); None if that
    launcher is not loaded in this agent."""
    launchers = LAUNCHERS if launchers is None else launchers
    return launchers.get(str(info.get("launcher") or "direct"))


def kill_run_dir(info, launchers=None):
    """For `sshpyk kill` and the stale sweep: kill the kernel of a run dir found by
    scan (what its launcher started: its process group, a batch kernel's job too) and
    remove the dir. Returns None, or why the kernel may still run or the dir is still
    there (one line).

    The pid is only signalled if verify_kernel_pid accepts it, else the dir is left.
    A record whose launcher is not loaded is treated as a direct one (its pid only)."""
    run_dir = info["run_dir"]
    uid = as_int(info.get("uid"), os.getuid())
    pid = as_int(info.get("pid"))
    launcher = record_launcher(info, launchers) or Launcher
    errors = []
    running = pid > 1 and pid_alive(pid)
    problem = verify_kernel_pid(pid, run_dir, uid, legacy_pid_mark(info)) if running else None
    if problem:
        errors.append("%s: not signalled" % problem)
    errors.extend(launcher.kill_record(info, pid if running and not problem else 0))
    if not problem:
        error = remove_tree(run_dir, uid)
        if error:
            errors.append(error)
    return "; ".join(errors) or None


def sweep(found, keep=(), launchers=None):
    """The stale sweep: remove this user's debris among ``found`` (what scan returned):
    agent dirs whose agent is dead (its socket refuses connections, or its peer is not
    the recorded pid of this uid), run dirs whose kernel is dead (or its pid is no
    longer that kernel) and whose agent is dead too, and, when no other agent of this
    user runs, dirs without a record older than UNRECORDED_STALE (a kernel being set up
    by a live agent has no record yet). Run dirs of a launcher that is not loaded
    (``launchers``, default: those of this agent) are left: for a batch kernel the
    record may be the only trace of a job that outlived its step; with the launcher
    loaded kill_run_dir ends that job (``sweep_kills``). Never another uid's dirs, never
    this agent's own, never the dirs in ``keep``. Returns the set of removed dirs."""
    kernels, agents, unrecorded = found
    uid, me = os.getuid(), os.getpid()
    keep = set(keep)
    removed = set()
    others_alive = False
    for agent in agents.values():
        if agent["uid"] != uid or agent["pid"] == me or agent["dir"] in keep:
            continue
        if agent["alive"]:
            others_alive = True
        elif remove_tree(agent["dir"], uid) is None:
            removed.add(agent["dir"])
    for info in kernels:
        if info["uid"] != uid or info["alive"] or info["run_dir"] in keep:
            continue
        agent_pid = as_int(info.get("agent_pid"))
        if agent_pid == me or info["agent_alive"] or pid_runs_as(agent_pid, uid):
            continue
        launcher = record_launcher(info, launchers)
        if launcher is None:
            continue
        if launcher.sweep_kills:
            error = kill_run_dir(info, launchers)
        else:
            # nothing to signal: the kernel is dead, or its pid is not the kernel any more
            error = remove_tree(info["run_dir"], uid)
        if error is None:
            removed.add(info["run_dir"])
    if not others_alive:
        now = time.time()
        for path, st in unrecorded:
            if st.st_uid != uid or path in keep or now - st.st_mtime < UNRECORDED_STALE:
                continue
            if remove_tree(path, uid) is None:
                removed.add(path)
    return removed


def annotate(kernels, launchers=None):
    """What ``ps`` adds to the records: each loaded launcher's view of its own."""
    launchers = LAUNCHERS if launchers is None else launchers
    for name, launcher in sorted(launchers.items()):
        mine = [k for k in kernels if str(k.get("launcher") or "direct") == name]
        if mine:
            launcher.annotate(mine)
    return kernels


def request_owner(msg):
    """Whose dirs a ps or kill request may see: this user's, or (``all_users``, root
    only) everybody's (None)."""
    if not msg.get("all_users"):
        return os.getuid()
    if os.getuid() != 0:
        raise AgentError(
            Kind.NOT_PERMITTED,
            "all_users needs root on the remote host (the agent runs as uid %d)" % os.getuid(),
        )
    return None
