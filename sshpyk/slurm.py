"""The SLURM launcher, local side: the kernelspec's SLURM arguments, the log lines for
queue and walltime events, and the check of the relay sockets on the login node.

With ``launcher: slurm`` the remote agent runs on the login node and submits each
kernel with ``srun`` (see ``SlurmKernel`` in ``bootstrap_slurm.py`` for why srun and not
sbatch). On its compute node the kernel binds only private sockets (ipc in a 0700 run
dir, or tcp on 127.0.0.1); its traffic is relayed to five unix sockets in the kernel's
0700 run dir on the login node over one TCP connection from the agent to the node side,
authenticated with a secret sent over srun's stdin ("the relay" in
``bootstrap_slurm.py``). Seen from here a SLURM kernel is an ipc kernel on the login
node: the local forwards reach it with ``direct-streamlocal`` channels on the one SSH
connection, and nothing of the kernel listens on the cluster network.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

import asyncssh

from .errors import ForwardingRefusedError, SSHPykError, translate_error

if TYPE_CHECKING:
    from .remote import KernelProcess, SlurmListener
    from .session import SSHSession

__all__ = [
    "LAUNCHERS",
    "check_relay",
    "duration",
    "parse_slurm_args",
    "slurm_logger",
    "slurm_summary",
]

LAUNCHERS = ("direct", "slurm")

_STDIO = "the kernel's stdio is how sshpyk drives it"
#: srun options sshpyk sets itself, and why a user may not
_MANAGED = {
    "--input": _STDIO,
    "-i": _STDIO,
    "--output": _STDIO,
    "-o": _STDIO,
    "--error": _STDIO,
    "-e": _STDIO,
    "--pty": _STDIO,
    "--unbuffered": _STDIO,
    "-u": _STDIO,
    "--label": _STDIO,
    "-l": _STDIO,
    "--multi-prog": "a kernel is one program",
    "--ntasks": "a kernel is one task",
    "-n": "a kernel is one task",
    "--test-only": "sshpyk check runs srun --test-only",
}


def parse_slurm_args(text: str) -> list[str]:
    """The srun arguments in ``text`` (shell quoting), or SSHPykError with the reason."""
    try:
        args = shlex.split(text)
    except ValueError as exc:
        raise SSHPykError(f"--slurm-args {text!r}: {exc}") from None
    for arg in args:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
        elif arg.startswith("-") and len(arg) >= 2:
            name = arg[:2]  # a short option, maybe with its value attached (-n4)
        else:
            continue  # the value of the option before
        if name in _MANAGED:
            raise SSHPykError(f"--slurm-args: {name} is set by sshpyk ({_MANAGED[name]})")
    return args


def duration(seconds: float | None) -> str:
    """``45s``, ``4m05s``, ``2h03m``, ``1d02h``."""
    if seconds is None:
        return "?"
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def slurm_summary(info: dict[str, Any]) -> str:
    """``job 123 RUNNING on node7`` / ``job 123 PENDING (Resources)`` from a SLURM dict."""
    job = info.get("job_id") or "?"
    state = info.get("state") or info.get("slurm_state") or "?"
    text = f"job {job} {state}"
    if info.get("node"):
        text += f" on {info['node']}"
    reason = info.get("reason") or info.get("slurm_reason")
    if reason and state != "RUNNING":
        text += f" ({reason})"
    return text


def slurm_logger(logger: Any, alias: str, kernel_id: str) -> SlurmListener:
    """A listener that logs a SLURM kernel's events: the queue (INFO, on every change
    and every status interval), the job's start (INFO), the walltime warning (WARNING).
    ``logger`` is a :class:`logging.Logger` (the provisioner passes its ``self.log``)."""

    def listen(process: KernelProcess, event: dict[str, Any]) -> None:
        prefix = f"[{alias}] kernel {kernel_id}: SLURM job {event.get('job_id') or '?'}"
        if event.get("warning") == "walltime":
            logger.warning(
                "%s on %s reaches its time limit in %s: save your work, SLURM will "
                "stop the kernel then",
                prefix,
                event.get("node") or "?",
                duration(event.get("time_left")),
            )
        elif event.get("state") == "RUNNING" and "endpoints" in event:
            logger.info(
                "%s running on %s (%s) after %s in the queue",
                prefix,
                event.get("node") or "?",
                event.get("host") or "?",
                duration(event.get("waited")),
            )
        else:
            reason = event.get("reason")
            logger.info(
                "%s %s for %s%s",
                prefix,
                str(event.get("state") or "pending").lower(),
                duration(event.get("waited")),
                f" (reason: {reason})" if reason else "",
            )

    return listen


async def check_relay(session: SSHSession, path: str) -> None:
    """Open (and close) a ``direct-streamlocal`` channel to one of the kernel's relay
    sockets on the login node (the node's agent connects it to the kernel): fails
    clearly if sshd refuses unix socket forwarding."""
    conn = await session.connection()
    try:
        _, writer = await conn.open_unix_connection(path)
    except asyncssh.ChannelOpenError as exc:
        raise ForwardingRefusedError(
            f"sshd on {session.alias!r} refuses unix socket forwarding ({exc.reason}): the "
            "slurm launcher relays the kernel through unix sockets on the login node, set "
            "AllowStreamLocalForwarding yes in its sshd_config"
        ) from exc
    except Exception as exc:
        raise translate_error(exc, session.alias, config=session.ssh_config) from exc
    writer.close()
