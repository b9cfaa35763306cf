"""The SSH kernelspec: where it is stored, and its edits (the model of its options is
:class:`sshpyk.config.KernelConfig`).

An SSH kernelspec is an ordinary ``kernel.json`` in the user's Jupyter data dir
(``JUPYTER_DATA_DIR`` respected) whose ``metadata.kernel_provisioner`` names
``sshpyk-provisioner`` and carries the provisioner's config. jupyter_client clients
never run its ``argv`` (the provisioner launches the remote kernel); clients that
ignore provisioners (VS Code, Zed, Positron) run it: ``python -m sshpyk.launch``,
the argv launcher (:mod:`sshpyk.launch`), with this Python's absolute path.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from jupyter_core.paths import jupyter_data_dir

from .config import (
    INTERRUPT_MODES,
    PROVISIONER_NAME,
    TRANSPORTS,
    KernelConfig,
    config_fields,
)
from .errors import SSHPykError

__all__ = [
    "INTERRUPT_MODES",
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


@dataclass(init=False)  # KernelConfig's __init__ takes the launchers' options too
class SSHKernelSpec(KernelConfig):
    """An installed (or about to be installed) SSH kernel: its :class:`KernelConfig`
    and the directory its kernel.json is in."""

    resource_dir: str | None = None

    @classmethod
    def from_kernel_json(  # type: ignore[override]
        cls, name: str, data: dict[str, Any], resource_dir: str | None = None
    ) -> SSHKernelSpec:
        return super().from_kernel_json(name, data, resource_dir=resource_dir)

    def to_kernel_json(self, resource_dir: str | None = None) -> dict[str, Any]:
        """kernel.json; its argv names ``resource_dir`` (default: where it is installed)."""
        return super().to_kernel_json(resource_dir or self.resource_dir)

    def as_dict(self) -> dict[str, Any]:
        """Every field; the launchers' options among them, by name."""
        values = asdict(self)
        values.update(values.pop("launcher_options"))
        return values


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
        json.dump(spec.to_kernel_json(resource_dir=path), f, indent=2)
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


def edited_spec(
    spec: SSHKernelSpec,
    changes: dict[str, Any],
    *,
    set_env: dict[str, str] | None = None,
    unset_env: tuple[str, ...] | list[str] = (),
) -> SSHKernelSpec:
    """A validated copy of ``spec`` with ``changes`` (field -> value; None = keep).

    An empty string puts a clearable field back to its default (display name, ssh
    config, pre-command, remote cwd, remote run root, a scheduler's job arguments). ``unset_env``
    keys are removed from the remote environment, then ``set_env`` is merged in.
    Provisioner keys this version does not know are kept.
    """
    new = replace(spec, remote_env=dict(spec.remote_env), extra=dict(spec.extra))  # copies
    known = {f.name: f for f in config_fields()}
    for name, value in changes.items():
        if name not in known:
            raise SSHPykError(f"{name!r} is not a kernelspec field")
        if value is None:
            continue
        option = known[name].option
        if option.required and not str(value).strip():
            raise SSHPykError(f"{option.label} cannot be empty")
        if option.clearable and value == "":
            value = known[name].default
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
    """(field, old value, new value) for every option that differs."""
    return [
        (f.name, getattr(old, f.name), getattr(new, f.name))
        for f in config_fields()
        if getattr(old, f.name) != getattr(new, f.name)
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
