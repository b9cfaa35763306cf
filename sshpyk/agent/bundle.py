"""What is sent to the remote host: the agent's modules, as ``protocol.LOADER`` reads
them (see ``remote/loader.py``).

The core modules start every agent; a launcher's modules (``Launcher.remote_modules``:
a batch scheduler's) follow in a ``load`` request before an agent's first request of
that launcher, so agents that only run direct kernels never receive nor compile them
(57 kB, ~10 ms of agent start).
"""

from __future__ import annotations

import functools
from importlib import resources

from .remote.loader import encode_bundle

__all__ = ["CORE_MODULES", "agent_bundle", "module_sources"]

#: in dependency order: a module imports only those before it (tests/unit checks it)
CORE_MODULES = (
    "loader",
    "protocol",
    "jsonlines",
    "procgroup",
    "paths",
    "kernelspecs",
    "zmtp",
    "resume",
    "relayio",
    "idle",
    "links",
    "launcher",
    "direct",
    "records",
    "usage",
    "spares",
    "ports",
    "workers",
    "discover",
    "owners",
    "agent",
    "main",
)


@functools.cache
def _sources(names: tuple[str, ...]) -> dict[str, str]:
    package = resources.files("sshpyk.agent.remote")
    return {name: package.joinpath(name + ".py").read_text("utf-8") for name in names}


@functools.cache
def agent_bundle() -> bytes:
    """What the agent's stdin starts with (after the pre-command): the core modules."""
    return encode_bundle(_sources(CORE_MODULES))


def module_sources(names: tuple[str, ...]) -> dict[str, str]:
    """{module: source} of the agent's modules ``names`` (a launcher's, in dependency
    order), for a ``load`` request."""
    return dict(_sources(tuple(names)))
