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
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from .errors import SSHPykError

__all__ = [
    "PROVISIONER_NAME",
    "SSHKernelSpec",
    "delete_spec",
    "kernels_dir",
    "load_spec",
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
    )

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise SSHPykError(
                f"invalid kernel name {self.name!r}: use letters, digits, '.', '_' and '-'"
            )
        if not self.ssh_host_alias:
            raise SSHPykError("an SSH host alias is required (--ssh-host-alias)")
        if self.transport not in TRANSPORTS:
            raise SSHPykError(f"transport must be one of {', '.join(TRANSPORTS)}")
        if self.interrupt_mode not in INTERRUPT_MODES:
            raise SSHPykError(f"interrupt mode must be one of {', '.join(INTERRUPT_MODES)}")
        if not self.start_timeout > 0:
            raise SSHPykError("start timeout must be a positive number of seconds")
        if self.ssh_config and not os.path.isfile(self.ssh_config):
            raise SSHPykError(f"ssh config file {self.ssh_config} does not exist")

    def to_kernel_json(self) -> dict[str, Any]:
        config = {k: getattr(self, k) for k in self.PROVISIONER_KEYS}
        config = {k: v for k, v in config.items() if v not in (None, {}, "")}
        return {
            "argv": [
                "sshpyk-remote-kernel",
                self.ssh_host_alias,
                self.remote_kernel_name,
                "{connection_file}",
            ],
            "display_name": self.display_name
            or f"{self.remote_kernel_name} ({self.ssh_host_alias})",
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


def write_spec(spec: SSHKernelSpec, *, replace: bool = False) -> str:
    """Write ``kernel.json`` for ``spec``; refuses to overwrite unless ``replace``."""
    spec.validate()
    path = os.path.join(kernels_dir(), spec.name)
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


def load_spec(name: str) -> SSHKernelSpec:
    """Load an installed SSH kernelspec by name (any Jupyter kernel dir)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        resource_dir = KernelSpecManager().find_kernel_specs()[name.lower()]
    except KeyError:
        raise SSHPykError(f"no kernel named {name!r} (see `sshpyk list`)") from None
    except NoSuchKernel:  # pragma: no cover - defensive
        raise SSHPykError(f"no kernel named {name!r}") from None
    with open(os.path.join(resource_dir, "kernel.json"), encoding="utf-8") as f:
        data = json.load(f)
    return SSHKernelSpec.from_kernel_json(name, data, resource_dir)


def delete_spec(spec: SSHKernelSpec) -> None:
    if spec.resource_dir:
        shutil.rmtree(spec.resource_dir)
