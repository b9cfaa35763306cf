"""What ``sshpyk list`` shows: installed kernels as text blocks or JSON.

Local kernels and SSH kernels come from the same Jupyter kernel search path; an SSH
kernel is one whose ``metadata.kernel_provisioner`` names ``sshpyk-provisioner``.
The block format follows the original sshpyk::

    ----- SSH Kernel -----
    Name:                  ssh_gpu
    SSH Host Alias:        (v) gpubox
    ...
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SSHPykError
from ..kernels.launcher import Launcher, find_launcher
from ..kernelspec import InstalledKernel, SSHKernelSpec, installed_kernels
from .live import KernelStatus
from .report import Status

__all__ = ["KernelEntry", "collect_kernels", "entry_json", "render_block"]

LOCAL_HEADER = "---- Local Kernel ----"
SSH_HEADER = "----- SSH Kernel -----"
_LABEL_WIDTH = len("Remote Interrupt Mode: ")


@dataclass
class KernelEntry:
    kernel: InstalledKernel
    #: the SSH kernelspec (None for local kernels)
    spec: SSHKernelSpec | None = None
    #: the live checks (None when not checked)
    status: KernelStatus | None = None
    #: why the kernel cannot be shown fully (unreadable or invalid kernel.json)
    error: str | None = None

    @property
    def is_ssh(self) -> bool:
        return self.kernel.is_ssh


def collect_kernels(*, local: bool = True, remote: bool = True) -> list[KernelEntry]:
    """Installed kernels, local ones first, each group sorted by name."""
    entries = []
    for kernel in installed_kernels():
        entry = KernelEntry(kernel, error=kernel.error)
        if kernel.is_ssh:
            try:
                entry.spec = kernel.spec
            except (SSHPykError, TypeError) as exc:
                entry.error = f"invalid sshpyk config in {kernel.resource_dir}/kernel.json: {exc}"
        if (remote and kernel.is_ssh) or (local and not kernel.is_ssh):
            entries.append(entry)
    entries.sort(key=lambda e: (e.is_ssh, e.kernel.name))
    return entries


def _line(label: str, value: object) -> str:
    return f"{label + ':':<{_LABEL_WIDTH}}{value}"


def simplified_command(spec: SSHKernelSpec) -> str:
    """What runs, in one line (the real command feeds the sshpyk agent on stdin)."""
    pre = f"{shlex.quote(spec.pre_command)} && " if spec.pre_command else ""
    command = (
        f"ssh {spec.ssh_host_alias} {pre}{spec.remote_python} <sshpyk agent> "
        f"--kernel={spec.remote_kernel_name}"
    )
    launcher = find_launcher(spec.launcher)
    return command + (launcher.command_tail(spec) if launcher else "")


def remote_command_line(remote_spec: dict[str, Any], remote: dict[str, Any]) -> str:
    """The remote kernelspec's argv as the agent runs it: a bare ``python`` (or
    ``python3``, ``python3.X``) becomes the remote python, as jupyter_client does."""
    argv = [str(a) for a in remote_spec.get("argv") or []]
    version = str(remote.get("python_version") or "")
    bare = {"python", "python3", "python" + ".".join(version.split(".")[:2])}
    if argv and argv[0] in bare and remote.get("python"):
        argv[0] = str(remote["python"])
    return " ".join(argv)


def render_block(entry: KernelEntry, mark: Callable[[Status], str] | None = None) -> str:
    """One kernel as a text block; ``mark`` renders a check status (e.g. coloured)."""
    kernel, data = entry.kernel, entry.kernel.data
    lines = [SSH_HEADER if entry.is_ssh else LOCAL_HEADER, _line("Name", kernel.name)]
    if data.get("display_name"):
        lines.append(_line("Display Name", data["display_name"]))
    lines.append(_line("Resource Dir", kernel.resource_dir))
    spec = entry.spec
    if spec is None:
        if data.get("argv"):
            lines.append(_line("Command", " ".join(str(a) for a in data["argv"])))
        if data.get("language"):
            lines.append(_line("Language", data["language"]))
        if data:
            lines.append(_line("Interrupt Mode", data.get("interrupt_mode", "signal")))
        provisioner = ((data.get("metadata") or {}).get("kernel_provisioner") or {}).get(
            "provisioner_name"
        )
        if provisioner:
            lines.append(_line("Provisioner", provisioner))
        if entry.error:
            lines.append(_line("Error", entry.error))
        return "\n".join(lines)

    status = entry.status

    def marked(value: object, check: str) -> str:
        if status is None:
            return str(value)
        result: Status = getattr(status, check)
        return f"{mark(result) if mark else result.mark} {value}"

    remote = status.remote if status else {}
    remote_spec = remote.get("kernelspec") or {}
    lines += [
        _line("Command (simplified)", simplified_command(spec)),
        _line("Language", spec.language),
        _line("Interrupt Mode", spec.interrupt_mode),
        _line("SSH Host Alias", marked(spec.ssh_host_alias, "alias")),
    ]
    if spec.ssh_config:
        lines.append(_line("SSH Config", spec.ssh_config))
    lines.append(_line("Remote Python Prefix", marked(spec.remote_python, "python")))
    if remote.get("python"):
        detail = f"{remote['python']} (Python {remote.get('python_version')}"
        if remote.get("jupyter_client"):
            detail += f", jupyter_client {remote['jupyter_client']}"
        lines.append(_line("Remote Python", detail + ")"))
    lines.append(_line("Remote Kernel Name", marked(spec.remote_kernel_name, "kernel")))
    if remote_spec:
        lines += [
            _line("Remote Language", remote_spec.get("language")),
            _line("Remote Resource Dir", remote_spec.get("resource_dir")),
            _line("Remote Interrupt Mode", remote_spec.get("interrupt_mode") or "signal"),
        ]
    lines.append(_line("Start Timeout", f"{spec.start_timeout:g}"))
    lines.append(_line("Transport", spec.transport))
    lines.append(_line("Local Transport", spec.local_transport))
    launcher: Launcher | None = find_launcher(spec.launcher)
    if launcher is not None:
        lines += [
            _line(label, value)
            for label, value in launcher.listing_lines(
                spec, remote, lambda value: marked(value, "launcher")
            )
        ]
    if spec.remote_env:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.remote_env.items()))
        lines.append(_line("Remote Env", env))
    if spec.pre_command:
        lines.append(_line("Pre-command", spec.pre_command))
    if spec.remote_cwd:
        lines.append(_line("Remote CWD", spec.remote_cwd))
    if spec.remote_run_root:
        lines.append(_line("Remote Run Root", spec.remote_run_root))
    if remote_spec.get("argv"):
        lines.append(_line("Remote Command", remote_command_line(remote_spec, remote)))
    if spec.extra:
        lines.append(_line("Other Config Keys", ", ".join(sorted(spec.extra))))
    if status is not None and status.error:
        lines.append(_line("Problem", status.error))
    return "\n".join(lines)


def entry_json(entry: KernelEntry) -> dict[str, Any]:
    """Everything about one kernel, machine-readable; ``spec`` round-trips to
    :class:`~sshpyk.kernelspec.SSHKernelSpec` (``SSHKernelSpec(**entry["spec"])``)."""
    kernel, data = entry.kernel, entry.kernel.data
    provisioner = ((data.get("metadata") or {}).get("kernel_provisioner") or {}).get(
        "provisioner_name"
    )
    out: dict[str, Any] = {
        "name": kernel.name,
        "kind": "ssh" if entry.is_ssh else "local",
        "display_name": data.get("display_name"),
        "language": data.get("language"),
        "interrupt_mode": data.get("interrupt_mode", "signal"),
        "resource_dir": kernel.resource_dir,
        "argv": data.get("argv"),
        "provisioner": provisioner,
        "error": entry.error,
    }
    if entry.is_ssh:
        out["spec"] = entry.spec.as_dict() if entry.spec else None
        out["checks"] = entry.status.as_dict() if entry.status else None
    return out
