"""``sshpyk check``: the stage runner.

It walks the path a kernel start takes, one stage at a time, timing each and stopping
at the first fatal failure, with a suggested fix for it::

    config resolution -> TCP connect -> host key -> authentication -> remote python
    -> jupyter_client -> remote kernelspec -> TCP forwarding -> ipc (unix sockets)
    [-> the launcher's own stage: a scheduler (login node)] -> test kernel started and answering

For a batch kernelspec the test kernel is a real job (its id, node and state are
reported). The stages live in :mod:`.connect`, :mod:`.remote`, :mod:`.forwarding` and
:mod:`.launch`; their vocabulary in :mod:`.report`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..kernels.launcher import launcher_for
from .connect import stage_config, stage_connect
from .forwarding import stage_forwarding, stage_ipc
from .launch import stage_kernel, stage_launcher
from .remote import stage_kernelspec, stage_python
from .report import (
    ALL_STAGES,
    STAGES,
    CheckTarget,
    Diagnosis,
    StageFailedError,
    StageResult,
    Status,
)

__all__ = [
    "ALL_STAGES",
    "STAGES",
    "CheckTarget",
    "StageResult",
    "Status",
    "run_check",
    "stages_for",
]


def stages_for(launcher: str) -> tuple[tuple[str, str], ...]:
    """The stages ``sshpyk check`` runs for a kernelspec with this launcher."""
    own = launcher_for(launcher).check_stage
    return STAGES if own is None else (*STAGES[:-1], own, STAGES[-1])


async def run_check(
    target: CheckTarget,
    *,
    timeout: float = 30.0,
    test_kernel: bool = True,
    report: Callable[[StageResult], None] | None = None,
) -> list[StageResult]:
    """Run every stage for ``target``; ``report`` sees each result as it is recorded.

    Stops at the first fatal failure (later stages are reported as skipped). Each
    stage is bounded by ``timeout`` seconds (the test kernel by its start timeout plus
    ``timeout``). Never raises SSHPykError: failures are results.
    """
    d = Diagnosis(
        target, timeout=timeout, test_kernel=test_kernel, report=report or (lambda r: None)
    )
    try:
        await stage_config(d)
        await stage_connect(d)
        await stage_python(d)
        await stage_kernelspec(d)
        await stage_forwarding(d)
        await stage_ipc(d)
        if launcher_for(target.launcher).check_stage is not None:
            await stage_launcher(d)
        await stage_kernel(d)
    except StageFailedError:
        done = {r.stage for r in d.results}
        for stage, _ in stages_for(target.launcher):
            if stage not in done:
                d.record(stage, Status.SKIP, None, "skipped: an earlier stage failed")
    finally:
        if d.session is not None:
            await d.session.aclose()
    return d.results
