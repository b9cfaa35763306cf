"""LaunchRequest: what a kernel launch asks of the agent (:mod:`sshpyk.agent.client` sends it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULTS
from .remote.protocol import Op

__all__ = ["LaunchRequest"]


@dataclass
class LaunchRequest:
    """A ``launch`` request: the kernel's HMAC key and its launch options, i.e. the
    :class:`~sshpyk.config.KernelConfig` fields marked ``request``, under their kernel
    names (kernel_name, transport, env, cwd, persistent, launcher, the launcher's own
    options, ...)."""

    key: str
    signature_scheme: str = "hmac-sha256"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def launcher(self) -> str:
        return str(self.options.get("launcher") or DEFAULTS.launcher)

    @property
    def persistent(self) -> bool:
        return bool(self.options.get("persistent", DEFAULTS.persistent))

    def message(self, kid: str) -> dict[str, Any]:
        return {
            "op": Op.LAUNCH,
            "kid": kid,
            "key": self.key,
            "signature_scheme": self.signature_scheme,
            **self.options,
        }
