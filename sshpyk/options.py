"""The metadata of a kernel option (:class:`Option`, :class:`ConfigField`) and the
launchers' own options.

:mod:`sshpyk.config` declares every option of :class:`~sshpyk.config.KernelConfig` with
an :class:`Option`; a launcher declares its own (a scheduler's job arguments, its
queue timeout) with :func:`launcher_field` and registers them with
:func:`register_launcher` (the launcher contract does it,
``sshpyk.kernels.launcher.register``). They are options like the others: in
``config_fields()``, read and set as attributes of a config (and of the kernel layer's
options, by their kernel names), kept in its ``launcher_options``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from .errors import SSHPykError

__all__ = [
    "ConfigField",
    "Option",
    "Store",
    "init_with_launcher_options",
    "is_launcher_option",
    "launcher_field",
    "launcher_fields",
    "launcher_names",
    "launcher_value",
    "register_launcher",
    "unregister_launcher",
]


class Store(enum.Enum):
    """Where kernel.json keeps a field."""

    #: the kernel's directory name (``kernels/<name>/kernel.json``)
    NAME = "name"
    #: a top-level kernel.json key (display_name, language, interrupt_mode)
    TOP = "top"
    #: ``metadata.kernel_provisioner.config``: a provisioner option (a trait)
    PROVISIONER = "provisioner"


@dataclass(frozen=True)
class Option:
    """The metadata of one :class:`KernelConfig` field."""

    #: what it is, for ``--help`` and the provisioner's trait
    help: str
    #: the noun used in error messages ("start timeout must be ...")
    label: str
    store: Store = Store.PROVISIONER
    #: the CLI flag, if not ``--`` + the name with dashes
    flag: str | None = None
    #: the help of ``sshpyk edit`` when it says something else than ``help``
    edit_help: str | None = None
    choices: tuple[str, ...] = ()
    #: may not be empty
    required: bool = False
    #: ``edit`` with an empty value puts the default back
    clearable: bool = False
    #: ``add`` takes the remote kernelspec's value unless one is given
    from_remote: bool = False
    #: ``add``/``edit`` check a changed value against the host (unless --no-check)
    checked: bool = False
    #: a local file that must exist
    path: bool = False
    metavar: str | None = None
    #: numbers: the smallest value allowed; positive: larger than 0
    minimum: float | None = None
    positive: bool = False
    #: what numbers count, for error messages
    unit: str = "seconds"
    #: any other rule: returns what is wrong with a value, or None
    check: Callable[[Any], str | None] | None = None
    #: the kernel layer's value of it (e.g. job arguments split like a shell): raises
    #: SSHPykError (the one-line problem) for a value it cannot take
    parse: Callable[[Any], Any] | None = None
    #: the launcher it belongs to: with any other launcher, not stored while default
    launcher: str | None = None
    #: not stored while it has its default (options kernel.json did not always have)
    omit_default: bool = False
    #: its name in KernelOptions (the kernel layer), or None if the kernel never sees it
    kernel: str | None = None
    #: also sent to the remote agent in the launch request (under its ``kernel`` name)
    request: bool = False


@dataclass(frozen=True)
class ConfigField:
    """One option of :class:`~sshpyk.config.KernelConfig` (a field, or a launcher's own)
    with its type, default and :class:`Option`."""

    name: str
    #: str, float, int, bool, dict or list (of str)
    type: type
    #: None is allowed (and means: not set)
    optional: bool
    option: Option
    #: its default (for dict and list fields: see ``factory``)
    declared_default: Any = None
    #: what makes a fresh default, for dict and list fields
    factory: Callable[[], Any] | None = None

    @property
    def store(self) -> Store:
        return self.option.store

    @property
    def help(self) -> str:
        if self.name == "launcher":  # the launchers say what they do
            words = "; ".join(f"{name}: {what}" for name, what in _LAUNCHERS.items())
            return f"{self.option.help} {words}."
        return self.option.help

    @property
    def choices(self) -> tuple[str, ...]:
        """The values it may take (the launcher: every registered launcher)."""
        return launcher_names() if self.name == "launcher" else self.option.choices

    @property
    def flag(self) -> str:
        return self.option.flag or "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        """A fresh default (a new dict for dict fields)."""
        return self.factory() if self.factory else self.copy(self.declared_default)

    def kernel_value(self, value: Any) -> Any:
        """``value`` as the kernel layer takes it (``Option.parse``, e.g. split)."""
        value = self.copy(value)
        return self.option.parse(value) if self.option.parse else value

    def copy(self, value: Any) -> Any:
        if isinstance(value, dict):
            return dict(value)
        return list(value) if isinstance(value, list) else value

    def loaded(self, value: Any) -> Any:
        """``value`` as read from kernel.json (JSON has no float 60: it writes 60)."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            return int(value)
        return self.copy(value)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this field, or None."""
        opt = self.option
        if value is None or value == "" or value == {} or value == []:
            return f"{opt.label} is required ({self.flag})" if opt.required else None
        if self.choices and value not in self.choices:
            return f"{opt.label} must be one of {', '.join(self.choices)}"
        if opt.positive and not value > 0:
            return f"{opt.label} must be a positive number of {opt.unit}"
        if opt.minimum is not None and not value >= opt.minimum:
            return f"{opt.label} must be {opt.minimum:g} (off) or a number of {opt.unit}"
        if opt.path and not os.path.isfile(value):
            return f"{opt.label} {value} does not exist"
        if opt.parse:
            try:
                opt.parse(value)
            except SSHPykError as exc:
                return str(exc)
        return opt.check(value) if opt.check else None


# -- the launchers' own options --------------------------------------------------------


def launcher_fields() -> tuple[ConfigField, ...]:
    """The launchers' own options, in registration order."""
    return tuple(_LAUNCHER_FIELDS.values())


#: launcher name -> what it does (the ``launcher`` option's help), in registration order
_LAUNCHERS: dict[str, str] = {}
#: a launcher's own option fields, by KernelConfig name
_LAUNCHER_FIELDS: dict[str, ConfigField] = {}


def launcher_field(name: str, default: Any, **meta: Any) -> ConfigField:
    """One option of a launcher's own (``meta``: :class:`Option`'s fields, ``launcher``
    among them), for :func:`register_launcher`. Its type is its default's."""
    return ConfigField(name, type(default), False, Option(**meta), default)


def register_launcher(name: str, help: str, options: tuple[ConfigField, ...] = ()) -> None:
    """Make ``name`` a value of the ``launcher`` option (``help``: what it does, in a
    few words) and ``options`` (from :func:`launcher_field`) options of every config:
    kernel.json, the provisioner's traits, ``add``/``edit``'s flags, the launch request.
    Called once per launcher when its module is imported, before any of these is
    derived (importing sshpyk imports every launcher)."""
    for f in options:
        if f.option.launcher != name or not f.option.kernel:
            raise ValueError(f"{f.name}: a launcher option needs launcher={name!r} and kernel")
        known = _LAUNCHER_FIELDS.get(f.name)
        if known is not None and known.option.launcher != name:
            raise ValueError(f"option {f.name!r} is already declared")
    _LAUNCHERS[name] = help
    _LAUNCHER_FIELDS.update((f.name, f) for f in options)
    _launcher_fields_by.cache_clear()


def unregister_launcher(name: str) -> None:
    """Undo :func:`register_launcher` (a launcher registered for a while: a test's)."""
    _LAUNCHERS.pop(name, None)
    for key in [k for k, f in _LAUNCHER_FIELDS.items() if f.option.launcher == name]:
        del _LAUNCHER_FIELDS[key]
    _launcher_fields_by.cache_clear()


def is_launcher_option(name: str) -> bool:
    """Whether ``name`` is a launcher's own option (its KernelConfig name)."""
    return name in _LAUNCHER_FIELDS


def launcher_names() -> tuple[str, ...]:
    """Every registered launcher (the ``launcher`` option's choices)."""
    return tuple(_LAUNCHERS)


@functools.cache
def _launcher_fields_by(attribute: str) -> dict[str, ConfigField]:
    """The launchers' options by their KernelConfig ``name`` or their ``kernel`` name."""
    if attribute == "name":
        return dict(_LAUNCHER_FIELDS)
    return {str(f.option.kernel): f for f in _LAUNCHER_FIELDS.values()}


def init_with_launcher_options(
    obj: Any, values: dict[str, Any], *, by_kernel_name: bool = True
) -> None:
    """A dataclass's ``__init__`` that also takes the launchers' options as keyword
    arguments (by their KernelConfig names, or with ``by_kernel_name`` their kernel
    layer names): into ``launcher_options``, which holds every one (those not given at
    their defaults, parsed for the kernel layer)."""
    values = dict(values)
    launcher = _launcher_fields_by("kernel" if by_kernel_name else "name")
    options = {
        name: f.kernel_value(f.default) if by_kernel_name else f.default
        for name, f in launcher.items()
    }
    options.update(values.pop("launcher_options", None) or {})
    object.__setattr__(obj, "launcher_options", options)
    for f in fields(obj):
        if f.name == "launcher_options":
            continue
        if f.name in values:
            value = values.pop(f.name)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            raise TypeError(f"{type(obj).__name__}() needs {f.name}")
        object.__setattr__(obj, f.name, value)
    for name, value in values.items():
        if name not in launcher:
            raise TypeError(f"{type(obj).__name__}() got an unexpected option {name!r}")
        options[name] = value


def launcher_value(obj: Any, name: str, *, by_kernel_name: bool) -> Any:
    """``obj.name`` for a launcher's option of a config (or with ``by_kernel_name`` of
    the kernel layer's options): its value, else its default; AttributeError if no
    launcher has an option of that name."""
    launcher = _launcher_fields_by("kernel" if by_kernel_name else "name")
    f = launcher.get(name)
    if f is None or name.startswith("__"):
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
    values = obj.__dict__.get("launcher_options") or {}
    if name in values:
        return values[name]
    return f.kernel_value(f.default) if by_kernel_name else f.default
