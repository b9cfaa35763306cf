"""KernelConfig: every option of an SSH kernel, declared once.

Each field of :class:`KernelConfig` carries an :class:`Option` in its metadata: where
kernel.json stores it (:class:`Store`), its help text, choices and validation, whether
``add`` reads its default from the remote kernelspec, and the name the kernel layer
(:class:`~sshpyk.kernel.KernelOptions`, the launch request) knows it by. Everything
else is derived from these declarations:

* kernel.json, written and read (:meth:`KernelConfig.to_kernel_json`,
  :meth:`KernelConfig.from_kernel_json`); provisioner keys this version does not know
  are kept in :attr:`KernelConfig.extra` and written back, so ``edit`` loses nothing;
* the provisioner's traits (:mod:`sshpyk.provisioner`), the options of ``sshpyk add``
  and ``sshpyk edit`` (:mod:`sshpyk.cli`), ``sshpyk check``'s target and the kernel's
  launch options (:meth:`sshpyk.kernel.KernelOptions.from_config`).

A new kernel option is one field here. A launcher's own options (a scheduler's job
arguments, its queue timeout) are declared in the launcher's module and registered
with :func:`register_launcher` (the launcher contract does it,
:func:`sshpyk.kernels.launcher.register`): they are :class:`ConfigField` objects like
the others, in :func:`config_fields`, read and set as attributes of the config, and
kept in :attr:`KernelConfig.launcher_options`.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

from .errors import SSHPykError
from .options import (
    ConfigField,
    Option,
    Store,
    init_with_launcher_options,
    is_launcher_option,
    launcher_field,
    launcher_fields,
    launcher_names,
    launcher_value,
    register_launcher,
)
from .values import check_forwards, parse_forward

__all__ = [
    "DEFAULTS",
    "INTERRUPT_MODES",
    "LAUNCH_MODULE",
    "LOCAL_TRANSPORTS",
    "PROVISIONER_NAME",
    "TRANSPORTS",
    "ConfigField",
    "KernelConfig",
    "Option",
    "Store",
    "config_field",
    "config_fields",
    "init_with_launcher_options",
    "launcher_field",
    "launcher_fields",
    "launcher_names",
    "launcher_value",
    "parse_forward",
    "register_launcher",
]

PROVISIONER_NAME = "sshpyk-provisioner"
#: the module kernel.json's argv runs (``python -m sshpyk.launch``)
LAUNCH_MODULE = "sshpyk.launch"
TRANSPORTS = ("auto", "ipc", "tcp")
LOCAL_TRANSPORTS = ("ipc", "tcp")
INTERRUPT_MODES = ("signal", "message")


def _option(default: Any, **meta: Any) -> Any:
    """A dataclass field with its :class:`Option` (for dict fields: field(default_factory=
    dict, metadata=_meta(...)))."""
    return field(default=default, metadata=_meta(**meta))


def _meta(**meta: Any) -> dict[str, Option]:
    return {"option": Option(**meta)}


_C = TypeVar("_C", bound="KernelConfig")
_NAME_RE = re.compile(r"^[a-zA-Z0-9._-]+$")


def _check_name(value: str) -> str | None:
    if _NAME_RE.match(value):
        return None
    return f"invalid kernel name {value!r}: use letters, digits, '.', '_' and '-'"


def _check_python(value: str) -> str | None:
    if not value.lstrip().startswith("-"):
        return None
    # the remote shell would read it as an option of `exec`, not as a program
    return (
        f"remote python {value!r} starts with '-': give a path or a "
        "command name (e.g. ./-odd-name for a relative path)"
    )


_CLEARS = " An empty value clears it."


@dataclass
class KernelConfig:
    """Everything an SSH kernelspec says, one field per option (see the module doc)."""

    name: str = _option(
        "",
        help="Local kernel name, e.g. ssh_gpu_py3.",
        edit_help="Rename the kernel.",
        label="kernel name",
        store=Store.NAME,
        flag="--kernel-name",
        required=True,
        check=_check_name,
    )
    ssh_host_alias: str = _option(
        "",
        help="Host alias from your ssh config.",
        label="SSH host alias",
        required=True,
        checked=True,
    )
    display_name: str = _option(
        "",
        help="Shown in Jupyter (default: the remote display name plus the alias).",
        label="display name",
        store=Store.TOP,
        clearable=True,
        from_remote=True,
    )
    language: str = _option(
        "python",
        help="Kernel language (default from the remote kernelspec).",
        label="language",
        store=Store.TOP,
        required=True,
        from_remote=True,
    )
    interrupt_mode: str = _option(
        "signal",
        help="Default: the remote kernelspec's.",
        label="interrupt mode",
        store=Store.TOP,
        choices=INTERRUPT_MODES,
        from_remote=True,
    )
    ssh_config: str | None = _option(
        None,
        help="ssh config file (default ~/.ssh/config).",
        label="ssh config file",
        clearable=True,
        checked=True,
        path=True,
    )
    remote_python: str = _option(
        "python3",
        help="Remote environment prefix (/opt/conda/envs/x) or python executable.",
        label="remote python",
        required=True,
        checked=True,
        check=_check_python,
        kernel="python",
    )
    remote_kernel_name: str = _option(
        "python3",
        help="Kernelspec name on the remote.",
        label="remote kernel name",
        required=True,
        checked=True,
        kernel="kernel_name",
        request=True,
    )
    start_timeout: float = _option(
        60.0,
        help="Seconds allowed for connect + kernel start.",
        label="start timeout",
        positive=True,
        kernel="start_timeout",
    )
    transport: str = _option(
        "auto",
        help="auto: ipc for ipykernel, else tcp.",
        label="transport",
        choices=TRANSPORTS,
        kernel="transport",
        request=True,
    )
    remote_env: dict[str, str] = field(
        default_factory=dict,
        metadata=_meta(
            help="Environment for the remote kernel (repeatable).",
            label="remote env",
            metavar="KEY=VALUE",
            kernel="env",
            request=True,
        ),
    )
    pre_command: str | None = _option(
        None,
        help="Shell code run on the remote before the kernel, e.g. 'module load cuda'.",
        label="pre-command",
        clearable=True,
        checked=True,
        kernel="pre_command",
    )
    remote_cwd: str | None = _option(
        None,
        help="Remote working directory (default: remote home).",
        label="remote cwd",
        clearable=True,
        kernel="cwd",
        request=True,
    )
    remote_run_root: str | None = _option(
        None,
        help="Remote dir for the kernels' private run dirs "
        "(default $XDG_RUNTIME_DIR or the temp dir).",
        label="remote run root",
        clearable=True,
        kernel="run_root",
    )
    grace_period: float = _option(
        30.0,
        help="Seconds a kernel survives once its local process is known to be gone: it"
        " exited and the connection broker, which outlives it, told the remote"
        " (a reset, a silent link or a process without a broker get the link grace).",
        label="grace period",
        positive=True,
        kernel="grace",
    )
    link_grace: float = _option(
        3600.0,
        help="Seconds a kernel survives a local side that went silent (laptop asleep,"
        " network gone): it keeps running, its output is kept, and the local side"
        " reconnects by itself until then.",
        label="link grace",
        positive=True,
        omit_default=True,
        kernel="link_grace",
    )
    connection_persist: float = _option(
        600.0,
        help="Seconds the SSH connection to the host stays up after its last user leaves."
        " Every sshpyk process of yours on this machine (Jupyter servers, VS Code's"
        " kernels, consoles, the CLI) shares it, one login and one agent per host, through"
        " a local connection broker; 0: no sharing, this process logs in itself."
        " $SSHPYK_SHARE_PERSIST overrides it.",
        label="connection persist",
        minimum=0.0,
        unit="s",
        omit_default=True,
        kernel="connection_persist",
    )
    outage_buffer: float = _option(
        64.0,
        help="MiB of kernel output the remote keeps per kernel while the link is down"
        " (past it the oldest iopub output is dropped, with a warning); 0 forwards the"
        " channels directly, and what a kernel sends during an outage is lost.",
        label="outage buffer",
        minimum=0.0,
        unit="MiB",
        omit_default=True,
        kernel="outage_buffer",
        request=True,
    )
    prestart: int = _option(
        0,
        help="Warm spare kernels the remote agent keeps started for this kernelspec: a"
        " start (or restart) from Jupyter takes one over at once, then a replacement"
        " starts. Direct kernels only; clients that choose the key (the argv launcher)"
        " always start a fresh kernel.",
        label="prestart",
        minimum=0.0,
        unit="kernels",
        omit_default=True,
        kernel="prestart",
        request=True,
    )
    persistent: bool = _option(
        False,
        help="Keep the kernel when the local side goes away without shutting it down"
        " (reattach with `sshpyk attach` or by reopening the notebook).",
        label="persistent",
        kernel="persistent",
        request=True,
    )
    idle_timeout: float = _option(
        0.0,
        help="Seconds a kernel may be idle (no execute request, no output, not busy) before"
        " the remote agent shuts it down, persistent kernels too; Jupyter then sees it"
        " dead (not restarted), the argv launcher exits with code 3. 0: never.",
        label="idle timeout",
        minimum=0.0,
        unit="s",
        omit_default=True,
        kernel="idle_timeout",
        request=True,
    )
    launcher: str = _option(
        "direct",
        # the launchers' own words follow (ConfigField.help), choices: every launcher
        help="How the kernel runs.",
        label="launcher",
        checked=True,
        omit_default=True,
        kernel="launcher",
        request=True,
    )
    forward: list[str] = field(
        default_factory=list,
        metadata=_meta(
            help="Forward a port of the remote side to this machine for the kernel's life"
            " (repeatable): PORT (the remote's localhost:PORT at http://127.0.0.1:PORT)"
            " or LOCAL_PORT:REMOTE_HOST:REMOTE_PORT (e.g. a dashboard on another node).",
            label="forward",
            metavar="[LOCAL:HOST:]PORT",
            clearable=True,
            check=check_forwards,
            kernel="forward",
        ),
    )
    auto_forward: bool = _option(
        True,
        help="Forward the TCP ports the kernel's processes listen on (TensorBoard, Dash,"
        " Bokeh, Dask dashboards...) to the same port on this machine, automatically.",
        label="auto forward",
        omit_default=True,
        kernel="auto_forward",
        request=True,
    )
    local_transport: str = _option(
        "ipc",
        help="How the local ends of the forwards listen: ipc (unix sockets in a private "
        "0700 directory: no other local user can connect) or tcp (127.0.0.1, for tools "
        "that only speak TCP).",
        label="local transport",
        choices=LOCAL_TRANSPORTS,
        omit_default=True,
        kernel="local_transport",
    )
    #: provisioner config keys this version does not know (kept as found, written back)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the values of the launchers' own options (register_launcher) that were set;
    #: read and set them as attributes (``config.<launcher>_args``), like the fields above
    launcher_options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        init_with_launcher_options(self, values, by_kernel_name=False)

    def __getattr__(self, name: str) -> Any:
        return launcher_value(self, name, by_kernel_name=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if is_launcher_option(name):
            self.launcher_options[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def default_display_name(self) -> str:
        return f"{self.remote_kernel_name} ({self.ssh_host_alias})"

    def validate(self) -> None:
        """SSHPykError for the first field that breaks its rules."""
        for f in config_fields():
            problem = f.problem(getattr(self, f.name))
            if problem:
                raise SSHPykError(problem)

    def kernel_values(self) -> dict[str, Any]:
        """The fields the kernel layer uses, under its names (KernelOptions' fields)."""
        return {
            f.option.kernel: f.kernel_value(getattr(self, f.name))
            for f in config_fields()
            if f.option.kernel
        }

    # -- kernel.json -----------------------------------------------------------------
    def launcher_argv(self, resource_dir: str | None = None) -> list[str]:
        """kernel.json's argv: the argv launcher (:mod:`sshpyk.launch`) run by this
        Python, for clients that ignore the provisioner and spawn argv themselves (VS
        Code, Zed, Positron). It names the kernelspec by its directory (exact, even
        with several data dirs) and by its name (looked up if the directory moved)."""
        where = ["--kernel-dir", os.path.abspath(resource_dir)] if resource_dir else []
        return [
            os.path.abspath(sys.executable),
            "-m",
            LAUNCH_MODULE,
            *where,
            "--kernel",
            self.name,
            "{connection_file}",
        ]

    def to_kernel_json(self, resource_dir: str | None = None) -> dict[str, Any]:
        """kernel.json for this config (``resource_dir``: where it is written, named
        in the argv)."""
        config = {}
        for f in config_fields(Store.PROVISIONER):
            value = getattr(self, f.name)
            if value is None or value == {} or value == "" or value == []:
                continue
            if value == f.default and (
                f.option.omit_default or f.option.launcher not in (None, self.launcher)
            ):
                continue
            config[f.name] = f.copy(value)
        config.update((k, v) for k, v in self.extra.items() if k not in config)
        top = {f.name: getattr(self, f.name) for f in config_fields(Store.TOP)}
        top["display_name"] = self.display_name or self.default_display_name
        return {
            "argv": self.launcher_argv(resource_dir),
            **top,
            "metadata": {
                "kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": config}
            },
        }

    @classmethod
    def from_kernel_json(cls: type[_C], name: str, data: Mapping[str, Any], **kwargs: Any) -> _C:
        """The config in ``data`` (a kernel.json) of kernel ``name``; missing keys take
        their defaults, unknown provisioner keys go to :attr:`extra`. ``kwargs`` are
        further fields of a subclass."""
        prov = (data.get("metadata") or {}).get("kernel_provisioner") or {}
        if prov.get("provisioner_name") != PROVISIONER_NAME:
            raise SSHPykError(f"kernel {name!r} is not an sshpyk kernel")
        config = dict(prov.get("config") or {})
        values: dict[str, Any] = {"name": name}
        for f in config_fields():
            source: Mapping[str, Any] = {Store.TOP: data, Store.PROVISIONER: config}.get(
                f.store, {}
            )
            if f.name in source:
                values[f.name] = f.loaded(source[f.name])
        extra = {k: v for k, v in config.items() if k not in values}
        return cls(**values, extra=extra, **kwargs)


@functools.cache
def _all_fields() -> tuple[ConfigField, ...]:
    hints = typing.get_type_hints(KernelConfig)
    found = []
    for f in fields(KernelConfig):
        if "option" not in f.metadata:
            continue
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        (base,) = [typing.get_origin(t) or t for t in kinds if t is not type(None)]
        factory = None if f.default_factory is MISSING else f.default_factory
        default = None if f.default is MISSING else f.default
        option = f.metadata["option"]
        found.append(ConfigField(f.name, base, type(None) in kinds, option, default, factory))
    return tuple(found)


def config_fields(store: Store | None = None) -> tuple[ConfigField, ...]:
    """The option fields of :class:`KernelConfig` in declaration order, the launchers'
    own options (in registration order) right after ``launcher``; those kept in
    ``store``, if given."""
    every: list[ConfigField] = []
    for f in _all_fields():
        every.append(f)
        if f.name == "launcher":
            every.extend(launcher_fields())
    return tuple(f for f in every if store is None or f.store is store)


def config_field(name: str) -> ConfigField:
    for f in config_fields():
        if f.name == name:
            return f
    raise KeyError(name)


#: every option at its default
DEFAULTS = KernelConfig()
