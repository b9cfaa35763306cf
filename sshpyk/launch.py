"""The argv launcher: a thin adapter from kernel.json's ``argv`` to the kernel layer.

Clients that ignore ``metadata.kernel_provisioner`` (VS Code's Jupyter extension, Zed,
Positron) choose the ports and the key, write a connection file and spawn the
kernelspec's argv with ``{connection_file}`` substituted. ``sshpyk add`` writes that
argv as ``[<python>, "-m", "sshpyk.launch", "--kernel-dir", DIR, "--kernel", NAME,
"{connection_file}"]``; this module is then the kernel process for the client:

* the settings come from the kernelspec (``DIR/kernel.json``, else the installed kernel
  ``NAME``) through :class:`~sshpyk.config.KernelConfig`, as the provisioner's do;
* the local listeners (:class:`~sshpyk.kernels.forwards.ForwardSet`) bind exactly the
  transport, ip and ports of the connection file. A non-loopback ip is bound as asked:
  the client chose it, and the kernel would listen there too; the ZMQ key still
  guards the channels;
* the remote kernel starts with the client's key and signature scheme
  (:meth:`RemoteKernel.launch`: the key goes to the agent on stdin, never in an argv
  or a log line);
* SIGINT interrupts the remote kernel (interrupt_mode ``signal``; in ``message`` mode
  the client's interrupt_request passes through the forwards like any message);
  SIGTERM shuts the remote kernel down; when the remote kernel exits (the client's
  shutdown_request) the launcher exits with its code, and with :data:`EXIT_IDLE` and a
  line on stderr when the agent shut it down for its idle timeout. If the launcher is
  killed, its SSH connection drops and the agent reaps the kernel after the grace period.

Errors are one line on stderr and a non-zero exit: the client shows that the kernel
died. Progress is logged to stderr at INFO, each stage with its duration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import LOCAL_TRANSPORTS, KernelConfig
from .errors import SSHPykError
from .kernels.forwards import CHANNELS
from .kernels.kernel import KernelOptions, RemoteKernel
from .kernels.session import SSHSession
from .kernelspec import SSHKernelSpec, find_kernel

__all__ = ["ConnectionFile", "load_kernelspec", "main", "run"]

log = logging.getLogger("sshpyk")

#: the exit code of a launcher that could not start the kernel
EXIT_FAILED = 1
#: ... and of a bad command line or connection file
EXIT_USAGE = 2
#: ... and when the remote agent shut the kernel down for its idle timeout
EXIT_IDLE = 3


@dataclass(frozen=True)
class ConnectionFile:
    """What the client's connection file says (the key is kept out of ``repr``)."""

    transport: str
    ip: str
    ports: dict[str, int]
    key: str
    signature_scheme: str

    def __repr__(self) -> str:
        return f"ConnectionFile({self.transport}://{self.ip} {self.ports})"

    @classmethod
    def read(cls, path: str) -> ConnectionFile:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise SSHPykError(f"cannot read connection file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SSHPykError(f"connection file {path} is not a JSON object")
        transport = data.get("transport", "tcp")
        if transport not in LOCAL_TRANSPORTS:
            raise SSHPykError(f"connection file {path}: unknown transport {transport!r}")
        ports = {}
        for channel in CHANNELS:
            port = data.get(f"{channel}_port")
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise SSHPykError(f"connection file {path}: no valid {channel}_port")
            ports[channel] = port
        key = data.get("key", "")
        ip = data.get("ip") or ("127.0.0.1" if transport == "tcp" else "")
        if not isinstance(key, str) or not isinstance(ip, str) or not ip:
            raise SSHPykError(f"connection file {path}: bad key or ip")
        scheme = str(data.get("signature_scheme") or "hmac-sha256")
        return cls(transport, ip, ports, key, scheme)


def load_kernelspec(kernel_dir: str | None, name: str | None) -> SSHKernelSpec:
    """The kernelspec in ``kernel_dir`` if it has a kernel.json, else the installed
    kernel ``name`` (the directory was moved, e.g. by a rename in another data dir)."""
    if kernel_dir and os.path.isfile(os.path.join(kernel_dir, "kernel.json")):
        path = os.path.join(kernel_dir, "kernel.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise SSHPykError(f"cannot read {path}: {exc}") from None
        spec_name = name or os.path.basename(os.path.normpath(kernel_dir))
        return SSHKernelSpec.from_kernel_json(spec_name, data, resource_dir=kernel_dir)
    if not name:
        raise SSHPykError(f"no kernel.json in {kernel_dir} and no --kernel name")
    return find_kernel(name).spec


async def run(spec: KernelConfig, conn: ConnectionFile) -> int:
    """Be the kernel process for the client of ``conn``; returns the exit code."""
    options = KernelOptions.from_config(spec)
    options.local_transport = conn.transport
    alias, started = spec.ssh_host_alias, time.monotonic()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_sigint() -> None:
        if spec.interrupt_mode != "signal":
            log.info("[%s] SIGINT ignored (interrupt_mode %s)", alias, spec.interrupt_mode)
        elif kernel.process is not None:
            log.info("[%s] kernel %s: interrupt", alias, kernel.kernel_id)
            kernel.process.send_signal(signal.SIGINT)

    def on_sigterm() -> None:
        log.info("[%s] SIGTERM: shutting the kernel down", alias)
        stop.set()

    session = await asyncio.wait_for(
        SSHSession.connect(
            alias,
            ssh_config=spec.ssh_config,
            connect_timeout=spec.start_timeout,
            persist=spec.connection_persist,
        ),
        spec.start_timeout,
    )
    kernel = RemoteKernel(session, options, client="argv")
    try:
        log.info("[%s] connected in %.3fs", alias, time.monotonic() - started)
        loop.add_signal_handler(signal.SIGINT, on_sigint)
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        t0 = time.monotonic()
        await kernel.forwards.open(conn.ports, ip=conn.ip, exact=True)
        log.info(
            "[%s] listening on %s %s ports %s in %.3fs",
            alias,
            conn.transport,
            conn.ip,
            ",".join(str(conn.ports[c]) for c in CHANNELS),
            time.monotonic() - t0,
        )
        await kernel.launch(conn.key, conn.signature_scheme)
        line, args = kernel.ready_line()
        log.info("[%s] kernel %s: " + line, alias, kernel.kernel_id, *args)
        exited = asyncio.ensure_future(kernel.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if exited.done():
            code = exited.result() or 0
            log.info("[%s] kernel %s exited (%s)", alias, kernel.kernel_id, code)
            if kernel.idle_shutdown is not None:
                idle = f"{kernel.idle_shutdown:.0f} s idle (idle timeout {spec.idle_timeout:g} s)"
                line = f"sshpyk.launch: [{alias}] kernel {kernel.kernel_id} shut down after {idle}"
                print(line, file=sys.stderr)
                return EXIT_IDLE
            return 0 if code in (0, None) else EXIT_FAILED
        exited.cancel()
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        t0 = time.monotonic()
        try:
            await asyncio.shield(kernel.close())
        finally:
            await session.aclose()
        log.info("[%s] closed in %.3fs", alias, time.monotonic() - t0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sshpyk.launch",
        description="Run an sshpyk kernel for a client that spawns kernel.json's argv.",
    )
    parser.add_argument("--kernel-dir", help="the kernelspec's directory (has kernel.json)")
    parser.add_argument("--kernel", help="the kernelspec's name (if the directory moved)")
    parser.add_argument("connection_file", help="the client's connection file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="[sshpyk.launch %(asctime)s %(levelname)s] %(message)s",
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    try:
        conn = ConnectionFile.read(args.connection_file)
        spec = load_kernelspec(args.kernel_dir, args.kernel)
        spec.validate()
    except SSHPykError as exc:
        print(f"sshpyk.launch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(run(spec, conn))
    except (SSHPykError, OSError, asyncio.TimeoutError) as exc:
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"sshpyk.launch: [{spec.ssh_host_alias}] {what}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # SIGINT before the handlers were installed
        return EXIT_FAILED
    except Exception as exc:  # one line for the client's log, not a traceback
        log.debug("launch failed", exc_info=True)
        print(
            f"sshpyk.launch: [{spec.ssh_host_alias}] {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return EXIT_FAILED


def _entry() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
