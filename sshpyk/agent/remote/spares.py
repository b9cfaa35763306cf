"""Warm spare kernels (the kernel option ``prestart``).

A launch request with ``prestart: N`` makes the agent keep N more kernels of that
kernelspec started and waiting (same kernel, environment, working dir and transport;
the pre-command is the agent's own, so the same too). A later launch of the same kind
that lets the agent choose the key (``spare_ok``: the provisioner, which hands the key
to jupyter_client with the connection info) takes one over: the same process, under the
new kernel id, with the key it was started with, already bound; then a replacement
starts. A client that dictates the key (the argv launcher) never gets a spare.

Spares are kernels of the agent like any other (``ps`` shows them, marked ``spare``):
reaped with the rest when the local side is gone past its grace, or at shutdown. Only
launchers that say they can hold spares (``Launcher.holds_spares``) get them: a
scheduler's spare would hold an allocation nobody asked for.
"""

import json
import os
import uuid

from .launcher import launcher_class
from .protocol import AgentError

#: the launch request's fields a spare must share with the launch it serves
_SAME = ("launcher", "kernel_name", "transport", "cwd", "signature_scheme", "outage_buffer")
#: per-launch environment a spare cannot have had (it is started before the launch)
_PER_LAUNCH_ENV = ("JPY_SESSION_NAME",)


def _holds_spares(request):
    try:
        return launcher_class(request.get("launcher")).holds_spares
    except AgentError:
        return False


def signature(request):
    env = {k: v for k, v in (request.get("env") or {}).items() if k not in _PER_LAUNCH_ENV}
    same = [request.get(name) for name in _SAME]
    return json.dumps([same, sorted(env.items())], sort_keys=True, default=str)


class Spares:
    def __init__(self, agent):
        self.agent = agent
        self.pools = {}  # signature -> [launcher, ...] (started, maybe not ready yet)

    def _alive(self, pool):
        pool[:] = [k for k in pool if k.exit_code is None and not k.cleaned]
        return pool

    def take(self, kid, request):
        """A spare for ``request``, now kernel ``kid`` (None if there is none)."""
        if not request.get("spare_ok") or not _holds_spares(request):
            return None
        pool = self._alive(self.pools.get(signature(request), []))
        if not pool:
            return None
        ready = [k for k in pool if k.ready]
        kernel = (ready or pool)[0]
        pool.remove(kernel)
        self.agent.kernels.pop(kernel.kid, None)
        kernel.adopt(kid, request)
        return kernel

    def fill(self, request):
        """Start spares until ``request``'s pool holds its ``prestart`` count."""
        try:
            count = int(request.get("prestart") or 0)
        except (TypeError, ValueError):
            count = 0
        if count <= 0 or not _holds_spares(request):
            return
        sig = signature(request)
        pool = self._alive(self.pools.setdefault(sig, []))
        for _ in range(min(count, 16) - len(pool)):  # bounded, whatever is asked
            kid = "spare-" + uuid.uuid4().hex
            env = {k: v for k, v in (request.get("env") or {}).items() if k not in _PER_LAUNCH_ENV}
            spare_request = dict(request, kid=kid, key=os.urandom(32).hex(), env=env)
            spare_request.update(persistent=False, spare=True)
            spare_request.pop("rid", None)
            kernel = launcher_class(request.get("launcher"))(self.agent, spare_request)
            self.agent.kernels[kid] = kernel
            try:
                kernel.launch()
            except AgentError:
                self.agent.kernels.pop(kid, None)
                self.agent.spawn(kernel.cleanup)
                return  # the real launch reports why; do not retry in a loop
            pool.append(kernel)
