"""What is sent to the remote host: the agent's modules, as ``protocol.LOADER`` reads
them (see ``remote/loader.py``).

The core modules start every agent; the SLURM modules follow in a ``load`` request
before an agent's first SLURM request, so agents that only run direct kernels never
receive nor compile them (57 kB, ~10 ms of agent start).
"""

from __future__ import annotations

import functools
from importlib import resources

from .remote.loader import encode_bundle

__all__ = ["CORE_MODULES", "SLURM_MODULES", "agent_bundle", "slurm_modules"]

#: in dependency order: a module imports only those before it (tests/unit checks it)
CORE_MODULES = (
    "loader",
    "protocol",
    "jsonlines",
    "procgroup",
    "paths",
    "kernelspecs",
    "resume",
    "relayio",
    "links",
    "launcher",
    "direct",
    "records",
    "spares",
    "ports",
    "workers",
    "owners",
    "agent",
    "main",
)
SLURM_MODULES = ("slurmctl", "relay", "slurm", "node")


@functools.cache
def _sources(names: tuple[str, ...]) -> dict[str, str]:
    package = resources.files("sshpyk.agent.remote")
    return {name: package.joinpath(name + ".py").read_text("utf-8") for name in names}


@functools.cache
def agent_bundle() -> bytes:
    """What the agent's stdin starts with (after the pre-command): the core modules."""
    return encode_bundle(_sources(CORE_MODULES))


def slurm_modules() -> dict[str, str]:
    """The SLURM launcher's modules, for a ``load`` request."""
    return dict(_sources(SLURM_MODULES))
