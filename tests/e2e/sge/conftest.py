"""Fixtures of the Grid Engine tests: one throwaway cluster (tests/support/sge.py) per
module, an empty queue before and after each test, and kernelspecs and options with
the sge launcher on it."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sshpyk import KernelOptions
from sshpyk.kernelspec import SSHKernelSpec, kernels_dir

from support.sge import SGE_ARGS, ThrowawaySGE, sge_missing
from support.waiting import wait_until

#: what the tests' jobs ask for: a slot of the PE and the checkpoint environment that
#: keeps a job through a task killed by a signal
TEST_ARGS = f"{SGE_ARGS} -ckpt keep"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ThrowawaySGE]:
    why = sge_missing()
    if why:
        pytest.skip(why)
    server = ThrowawaySGE()
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        pytest.skip(f"the throwaway Grid Engine did not start: {exc}")
    yield server
    server.stop()


@pytest.fixture
def sge(cluster: ThrowawaySGE) -> Iterator[ThrowawaySGE]:
    """The cluster with an empty queue, before and after the test."""
    cluster.enable()
    assert wait_until(lambda: cluster.jobs() == [], 20), cluster.jobs()
    yield cluster
    left = cluster.jobs()
    cluster.run("qdel", "-f", "-u", "*")  # keep the next tests clean either way
    cluster.enable()
    assert wait_until(lambda: cluster.jobs() == [], 20), cluster.jobs()
    assert left == [], f"jobs left: {left}"


@pytest.fixture
def sge_spec(
    make_kernelspec: Callable[..., SSHKernelSpec], sge: ThrowawaySGE
) -> Callable[..., SSHKernelSpec]:
    """An SSH kernelspec with the sge launcher on the test cluster; ``provisioner``
    sets provisioner options that are not kernelspec fields (straight into kernel.json)."""

    def make(
        name: str = "ssh_sge", provisioner: dict[str, Any] | None = None, **fields: Any
    ) -> SSHKernelSpec:
        settings: dict[str, Any] = {
            "launcher": "sge",
            "pre_command": sge.pre_command,
            "sge_args": f"{TEST_ARGS} -l h_rt=600",
        }
        settings.update(fields)
        spec = make_kernelspec(name, **settings)
        if provisioner:
            path = Path(kernels_dir()) / name / "kernel.json"
            data = json.loads(path.read_text())
            data["metadata"]["kernel_provisioner"]["config"].update(provisioner)
            path.write_text(json.dumps(data))
        return spec

    return make


def sge_options(sge: ThrowawaySGE, run_root: Path, **overrides: Any) -> KernelOptions:
    fields: dict[str, Any] = {
        "python": sys.executable,
        "pre_command": sge.pre_command,
        "run_root": str(run_root),
        "launcher": "sge",
        "sge_args": [*TEST_ARGS.split(), "-l", "h_rt=600"],
    }
    fields.update(overrides)
    return KernelOptions(**fields)
