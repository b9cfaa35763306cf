"""Kernelspecs beyond what the ``make_kernelspec`` fixture writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sshpyk.kernelspec import SSHKernelSpec, kernels_dir


def proxied_kernelspec(
    make_kernelspec: Callable[..., SSHKernelSpec], config: Path, name: str, **provisioner: object
) -> None:
    """A kernelspec through the proxy; ``provisioner`` keys (link_grace, outage_buffer,
    grace_period) go straight into kernel.json's metadata.kernel_provisioner.config."""
    make_kernelspec(name, ssh_host_alias="sshpyk-proxied", ssh_config=str(config))
    if provisioner:
        path = Path(kernels_dir()) / name / "kernel.json"
        data = json.loads(path.read_text())
        data["metadata"]["kernel_provisioner"]["config"].update(provisioner)
        path.write_text(json.dumps(data))
