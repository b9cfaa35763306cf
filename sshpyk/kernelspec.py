"""The SSH kernelspec: its model, and where it is stored.

An SSH kernelspec is an ordinary ``kernel.json`` in the user's Jupyter data dir
(``JUPYTER_DATA_DIR`` respected) whose ``metadata.kernel_provisioner`` names
``sshpyk-provisioner`` and carries the provisioner's config. Its ``argv`` is
never run (the provisioner launches the remote kernel); it documents the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from .errors import SSHPykError
from .slurm import LAUNCHERS, parse_slurm_args

__all__ = [
    "INTERRUPT_MODES",
    "LAUNCHERS",
    "PROVISIONER_NAME",
    "TRANSPORTS",
    "InstalledKernel",
    "SSHKernelSpec",
    "delete_spec",
    "edited_spec",
    "find_kernel",
    "installed_kernels",
    "kernels_dir",
    "load_spec",
    "save_edited_spec",
    "spec_changes",
    "write_spec",
]

PROVISIONER_NAME = "sshpyk-provisioner"
_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]+$")
TRANSPORTS = ("auto", "ipc", "tcp")
INTERRUPT_MODES = ("signal", "message")


@dataclass
class SSHKernelSpec:
    name: str
    ssh_host_alias: str
    display_name: str = ""
    language: str = "python"
    interrupt_mode: str = "signal"
    ssh_config: str | None = None
    remote_python: str = "python3"
    remote_kernel_name: str = "python3"
    start_timeout: float = 60.0
    transport: str = "auto"
    remote_env: dict[str, str] = field(default_factory=dict)
    pre_command: str | None = None
    remote_cwd: str | None = None
    remote_run_root: str | None = None
    grace_period: float = 60.0
    persistent: bool = False
    #: "direct", or "slurm": the host is a login node, each kernel a SLURM job (srun)
    launcher: str = "direct"
    #: srun arguments as typed, e.g. "--partition=gpu --gres=gpu:1 --time=04:00:00"
    slurm_args: str = ""
    slurm_queue_timeout: float = 600.0
    slurm_walltime_warning: float = 300.0
    resource_dir: str | None = None

    #: the keys stored under metadata.kernel_provisioner.config
    PROVISIONER_KEYS = (
        "ssh_host_alias",
        "ssh_config",
        "remote_python",
        "remote_kernel_name",
        "start_timeout",
        "transport",
        "remote_env",
        "pre_command",
        "remote_cwd",
        "remote_run_root",
        "grace_period",
        "persistent",
        "launcher",
        "slurm_args",
        "slurm_queue_timeout",
        "slurm_walltime_warning",
    )
    #: not stored for a direct kernel while they keep their defaults
    SLURM_KEYS = ("launcher", "slurm_args", "slurm_queue_timeout", "slurm_walltime_warning")

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise SSHPykError(
                f"invalid kernel name {self.name!r}: use letters, digits, '.', '_' and '-'"
            )
        if not self.ssh_host_alias:
            raise SSHPykError("an SSH host alias is required (--ssh-host-alias)")
        if not self.remote_python:
            raise SSHPykError("a remote python is required (--remote-python)")
        if self.remote_python.lstrip().startswith("-"):
            # the remote shell would read it as an option of `exec`, not as a program
            raise SSHPykError(
                f"remote python {self.remote_python!r} starts with '-': give a path or a "
                "command name (e.g. ./-odd-name for a relative path)"
            )
        if not self.remote_kernel_name:
            raise SSHPykError("a remote kernel name is required (--remote-kernel-name)")
        if self.transport not in TRANSPORTS:
            raise SSHPykError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.interrupt_mode not in INTERRUPT_MODES:
            raise SSHPykError(f"interrupt mode must be one of {', '.join(INTERRUPT_MODES)}")
        if not self.start_timeout > 0:
            raise SSHPykError("start timeout must be a positive number of seconds")
        if not self.grace_period > 0:
            raise SSHPykError("grace period must be a positive number of seconds")
        if self.ssh_config and not os.path.isfile(self.ssh_config):
            raise SSHPykError(f"ssh config file {self.ssh_config} does not exist")
        if self.launcher not in LAUNCHERS:
            raise SSHPykError(f"launcher must be one of {', '.join(LAUNCHERS)}")
        parse_slurm_args(self.slurm_args)
        if not self.slurm_queue_timeout > 0:
            raise SSHPykError("SLURM queue timeout must be a positive number of seconds")
        if not self.slurm_walltime_warning >= 0:
            raise SSHPykError("SLURM walltime warning must be 0 (off) or a number of seconds")
        if self.launcher == "slurm" and self.transport == "ipc":
            raise SSHPykError(
                "the slurm launcher needs --transport tcp or auto: unix sockets do not cross "
                "from the login node to a compute node"
            )

    @property
    def default_display_name(self) -> str:
        return f"{self.remote_kernel_name} ({self.ssh_host_alias})"

    def to_kernel_json(self) -> dict[str, Any]:
        config = {k: getattr(self, k) for k in self.PROVISIONER_KEYS}
        config = {k: v for k, v in config.items() if v not in (None, {}, "")}
        if self.launcher == "direct":
            defaults = {f.name: f.default for f in fields(self)}
            for key in self.SLURM_KEYS:
                if config.get(key) == defaults[key]:
                    config.pop(key, None)
        return {
            "argv": [
                "sshpyk-remote-kernel",
                self.ssh_host_alias,
                self.remote_kernel_name,
                "{connection_file}",
            ],
            "display_name": self.display_name or self.default_display_name,
            "language": self.language,
            "interrupt_mode": self.interrupt_mode,
            "metadata": {
                "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config}
            },
        }

    @classmethod
    def from_kernel_json(
        cls, name: str, data: dict[str, Any], resource_dir: str | None = None
    ) -> SSHKernelSpec:
        prov = (data.get("metadata") or {}).get("kernel_provisioner") or {}
        if prov.get("provisioner_name") != PROVISIONER_NAME:
            raise SSHPykError(f"kernel {name!r} is not an sshpyk kernel")
        config = dict(prov.get("config") or {})
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in known}
        return cls(
            name=name,
            display_name=data.get("display_name", ""),
            language=data.get("language", ""),
            interrupt_mode=data.get("interrupt_mode", "signal"),
            resource_dir=resource_dir,
            **kwargs,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kernels_dir() -> str:
    return os.path.join(jupyter_data_dir(), "kernels")


def write_spec(spec: SSHKernelSpec, *, replace: bool = False, directory: str | None = None) -> str:
    """Write ``kernel.json`` for ``spec``; refuses to overwrite unless ``replace``.

    The kernel goes into ``directory`` (an existing kernel's resource dir, when
    editing in place) or else ``<jupyter data dir>/kernels/<name>``.
    """
    spec.validate()
    path = directory or os.path.join(kernels_dir(), spec.name)
    spec_file = os.path.join(path, "kernel.json")
    if os.path.exists(spec_file) and not replace:
        raise SSHPykError(f"kernel {spec.name!r} already exists at {path} (use --replace)")
    os.makedirs(path, exist_ok=True)
    tmp = spec_file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_kernel_json(), f, indent=2)
        f.write("\n")
    os.replace(tmp, spec_file)  # atomic: a failed write never loses the old spec
    spec.resource_dir = path
    return path


@dataclass
class InstalledKernel:
    """Any installed Jupyter kernel (SSH or not), as found on the kernel search path."""

    name: str
    resource_dir: str
    data: dict[str, Any] = field(default_factory=dict)
    #: why kernel.json could not be read, if it could not
    error: str | None = None

    @property
    def is_ssh(self) -> bool:
        prov = (self.data.get("metadata") or {}).get("kernel_provisioner") or {}
        return bool(prov.get("provisioner_name") == PROVISIONER_NAME)

    @property
    def spec(self) -> SSHKernelSpec:
        """The SSH kernelspec; raises SSHPykError for other kernels."""
        return SSHKernelSpec.from_kernel_json(self.name, self.data, self.resource_dir)


def installed_kernels() -> list[InstalledKernel]:
    """Every kernel Jupyter would offer, sorted by name (unreadable ones carry an error)."""
    from jupyter_client.kernelspec import KernelSpecManager

    found = []
    for name, resource_dir in sorted(KernelSpecManager().find_kernel_specs().items()):
        kernel = InstalledKernel(name, resource_dir)
        try:
            with open(os.path.join(resource_dir, "kernel.json"), encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            kernel.data = data
        except (OSError, ValueError) as exc:
            kernel.error = f"cannot read {resource_dir}/kernel.json: {exc}"
        found.append(kernel)
    return found


def find_kernel(name: str) -> InstalledKernel:
    """The installed kernel ``name`` (any kind); SSHPykError if there is none."""
    for kernel in installed_kernels():
        if kernel.name == name.lower():
            if kernel.error:
                raise SSHPykError(kernel.error)
            return kernel
    raise SSHPykError(f"no kernel named {name!r} (see `sshpyk list`)")


def load_spec(name: str) -> SSHKernelSpec:
    """Load an installed SSH kernelspec by name (any Jupyter kernel dir)."""
    return find_kernel(name).spec


#: fields where an empty value means "back to the default"
_CLEARABLE = ("display_name", "ssh_config", "pre_command", "remote_cwd", "remote_run_root")
#: fields that must not be empty
_REQUIRED = ("name", "ssh_host_alias", "remote_python", "remote_kernel_name", "language")


def edited_spec(
    spec: SSHKernelSpec,
    changes: dict[str, Any],
    *,
    set_env: dict[str, str] | None = None,
    unset_env: tuple[str, ...] | list[str] = (),
) -> SSHKernelSpec:
    """A validated copy of ``spec`` with ``changes`` (field -> value; None = keep).

    An empty string clears an optional field (display name, ssh config, pre-command,
    remote cwd, remote run root). ``unset_env`` keys are removed from the remote
    environment, then ``set_env`` is merged in.
    """
    new = replace(spec, remote_env=dict(spec.remote_env))
    known = {f.name for f in fields(SSHKernelSpec)}
    for name, value in changes.items():
        if name not in known or name == "resource_dir":
            raise SSHPykError(f"{name!r} is not a kernelspec field")
        if value is None:
            continue
        if name in _REQUIRED and not str(value).strip():
            raise SSHPykError(f"{name.replace('_', ' ')} cannot be empty")
        if name in _CLEARABLE and value == "":
            value = "" if name == "display_name" else None
        setattr(new, name, value)
    for key in unset_env:
        if key not in new.remote_env:
            raise SSHPykError(f"{key!r} is not in the remote env of kernel {spec.name!r}")
        del new.remote_env[key]
    new.remote_env.update(set_env or {})
    if not new.display_name:
        new.display_name = new.default_display_name
    new.validate()
    return new


def spec_changes(old: SSHKernelSpec, new: SSHKernelSpec) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every stored field that differs."""
    return [
        (f.name, getattr(old, f.name), getattr(new, f.name))
        for f in fields(SSHKernelSpec)
        if f.name != "resource_dir" and getattr(old, f.name) != getattr(new, f.name)
    ]


def save_edited_spec(old: SSHKernelSpec, new: SSHKernelSpec, *, replace: bool = False) -> str:
    """Write ``new`` over the installed ``old``, in its kernel dir.

    A rename moves the whole kernel dir (logos and other resources too) next to the
    old one; an existing kernel of the new name is only overwritten with ``replace``.
    """
    if not old.resource_dir:
        raise SSHPykError(f"kernel {old.name!r} is not installed")
    if new.name == old.name:
        return write_spec(new, replace=True, directory=old.resource_dir)
    target = os.path.join(os.path.dirname(old.resource_dir), new.name)
    if os.path.exists(target):
        if not replace:
            raise SSHPykError(f"kernel {new.name!r} already exists at {target} (use --replace)")
        shutil.rmtree(target)
    shutil.copytree(old.resource_dir, target)
    try:
        path = write_spec(new, replace=True, directory=target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    shutil.rmtree(old.resource_dir)
    return path


def delete_spec(spec: SSHKernelSpec | InstalledKernel) -> None:
    """Remove the kernel's resource dir (kernel.json and anything next to it)."""
    if spec.resource_dir:
        shutil.rmtree(spec.resource_dir)
