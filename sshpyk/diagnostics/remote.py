"""The stages on the remote python: the agent starts (remote python), jupyter_client,
the remote kernelspec."""

from __future__ import annotations

import asyncio
import shlex
import time

from ..errors import (
    ProtocolError,
    RemoteJupyterClientMissingError,
    RemoteKernelSpecNotFoundError,
    RemotePythonNotFoundError,
    SSHPykError,
)
from ..kernels.kernel import KernelOptions
from .report import Diagnosis, Status

__all__ = ["stage_kernelspec", "stage_python"]

DEFAULT_GRACE = KernelOptions().grace


async def stage_python(d: Diagnosis) -> None:
    t = d.target
    started = time.monotonic()
    assert d.session is not None
    try:
        # the same agent key as the test kernel's, so that one is reused
        d.agent = await asyncio.wait_for(
            d.session.agent(t.python, t.pre_command, grace=DEFAULT_GRACE, run_root=t.run_root),
            d.timeout,
        )
    except (SSHPykError, asyncio.TimeoutError) as exc:
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"the remote python did not answer within {d.timeout:g}s"
        else:
            detail = str(exc)
        if isinstance(exc, RemotePythonNotFoundError):
            fix = "install Python >= 3.8 with jupyter_client there, or point at one: " + t.change(
                "--remote-python /path/to/env"
            )
        elif isinstance(exc, ProtocolError):
            fix = (
                "make the remote shell's startup files print nothing for non-interactive "
                "sessions (e.g. guard `echo` in ~/.bashrc with `[[ $- == *i* ]]`)"
            )
        elif t.pre_command:
            fix = f"check the pre-command: `ssh {t.alias} '{t.pre_command}'`"
        else:
            fix = f"run `ssh {t.alias} {shlex.quote(t.python)} -V` to see what happens"
        d.fail("python", time.monotonic() - started, detail, fix)
    assert d.agent is not None
    info = d.agent.info
    d.record(
        "python",
        Status.OK,
        time.monotonic() - started,
        f"{info.get('python')} (Python {info.get('python_version')})",
    )
    version = info.get("jupyter_client")
    if not version:
        d.fail(
            "jupyter_client",
            0.0,
            f"jupyter_client is not installed for {info.get('python')}",
            f"`{info.get('python')} -m pip install jupyter_client ipykernel` on the host, or "
            + t.change("--remote-python /path/to/env")
            + " to use an environment that has it",
        )
    major = str(version).split(".")[0]
    if major.isdigit() and int(major) < 7:
        d.record(
            "jupyter_client",
            Status.WARN,
            0.0,
            f"jupyter_client {version}: old, kernelspecs may resolve differently",
            f"`{info.get('python')} -m pip install -U jupyter_client`",
        )
    else:
        d.record("jupyter_client", Status.OK, 0.0, f"jupyter_client {version}")


async def stage_kernelspec(d: Diagnosis) -> None:
    t = d.target
    assert d.agent is not None
    started = time.monotonic()
    try:
        d.kernelspec = await asyncio.wait_for(d.agent.inspect(t.kernel_name), d.timeout)
    except (SSHPykError, asyncio.TimeoutError) as exc:
        detail = str(exc) or f"no answer within {d.timeout:g}s"
        if isinstance(exc, RemoteKernelSpecNotFoundError):
            fix = (
                "pick one of the available kernels: "
                + t.change("--remote-kernel-name NAME")
                + f", or install it there (`{t.python} -m ipykernel install --user`)"
            )
        elif isinstance(exc, RemoteJupyterClientMissingError):
            fix = f"`{t.python} -m pip install jupyter_client ipykernel` on the host"
        else:
            fix = None
        d.fail("kernelspec", time.monotonic() - started, detail, fix)
    spec = d.kernelspec
    d.record(
        "kernelspec",
        Status.OK,
        time.monotonic() - started,
        f"{t.kernel_name}: {spec.get('display_name')!r}, {spec.get('language')}, "
        f"interrupt {spec.get('interrupt_mode') or 'signal'}, in {spec.get('resource_dir')}",
    )
