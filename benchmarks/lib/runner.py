"""The bench: the throwaway sshd, the candidates' kernelspecs, and running driver
processes against them (each in its own interpreter), with what they leave behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import procstat

from .common import BENCHMARKS, GCM, TITLES, BenchError, log
from .proxy import DelayProxy
from .settings import Settings
from .venv125 import ensure_venv_125
from support.faultproxy import proxied_ssh_config
from support.sshd import ThrowawaySSHD, find_sshd

__all__ = ["Bench", "Candidate", "DriverRun", "workdir"]


@dataclass
class Candidate:
    name: str
    python: str
    #: kernelspec name per variant: "default" (ssh config as made by tests/support/sshd.py) and,
    #: for the SSH candidates, "gcm" (the same with ``Ciphers aes128-gcm@openssh.com``)
    kernels: dict[str, str]
    env: dict[str, str]
    leftovers: list[str] = field(default_factory=list)
    #: errors of driver runs that failed (each was retried once)
    failures: list[str] = field(default_factory=list)


@dataclass
class DriverRun:
    name: str
    label: str
    proc: subprocess.Popen[bytes]
    out: Path
    logfile: Path
    started: float
    #: the delay proxy this run goes through, if any, and its counters and the sshd's
    #: connection count (from its log) at the start
    proxy: DelayProxy | None = None
    counters: tuple[int, int, int] = (0, 0, 0)


class Bench:
    """The throwaway sshd, the kernelspecs, and running drivers against them."""

    def __init__(
        self, root: Path, settings: Settings, candidates: list[str], proxied: list[int]
    ) -> None:
        self.root = root
        self.settings = settings
        self.names = candidates
        self.sshd = ThrowawaySSHD(root / "sshd")
        self.candidates: dict[str, Candidate] = {}
        self.ssh_config_125 = root / "ssh_config-125"
        self.ssh_config_gcm = root / "ssh_config-gcm"
        self.ssh_config_125_gcm = root / "ssh_config-125-gcm"
        self.run_root = root / "remote-run"
        self.me = os.getpid()
        #: RTTs (ms) that get a delay proxy between the SSH candidates and the sshd
        self.proxied = proxied
        self.proxies: dict[int, DelayProxy] = {}
        #: per RTT: the ssh configs through its proxy (sshpyk's, 1.25's)
        self.proxied_configs: dict[int, tuple[Path, Path]] = {}
        #: the RTT being measured; its kernelspec variant is "rtt<ms>" (RTT 0 without a
        #: proxy: "default"; the reconnect section always needs one, see :meth:`variant`)
        self.rtt = 0
        #: the local kernel has been measured (it has no network: once for all RTTs)
        self.local_done = False

    def variant(self, rtt: int | None = None, reconnect: bool = False) -> str:
        rtt = self.rtt if rtt is None else rtt
        return "default" if rtt == 0 and not reconnect else f"rtt{rtt}"

    # set-up
    def start(self) -> None:
        if find_sshd() is None:
            raise BenchError("OpenSSH sshd not found (apt-get install openssh-server)")
        if shutil.which("ssh") is None:
            raise BenchError("OpenSSH ssh not found (apt-get install openssh-client)")
        self.sshd.start()
        self.run_root.mkdir(mode=0o700)
        log(f"sshd on 127.0.0.1:{self.sshd.port} (pid {self.sshd.proc and self.sshd.proc.pid})")
        (self.root / "cm").mkdir(mode=0o700)
        (self.root / "cm-gcm").mkdir(mode=0o700)
        self.ssh_config_125.write_text(self.config_125("cm"))
        self.ssh_config_gcm.write_text(f"Ciphers {GCM}\n\n" + self.sshd.ssh_config.read_text())
        self.ssh_config_125_gcm.write_text(f"Ciphers {GCM}\n\n" + self.config_125("cm-gcm"))
        for rtt in self.proxied:
            # delay per direction: FaultProxy's delay is added to every chunk each way
            proxy = self.proxies[rtt] = DelayProxy(self.sshd.port, rtt / 2 / 1000).start()
            where = self.root / f"rtt{rtt}"
            where.mkdir(mode=0o700)
            (where / "cm").mkdir(mode=0o700)
            ours = proxied_ssh_config(self.sshd, proxy, where, self.sshd.alias)
            theirs = where / "ssh_config-125"
            theirs.write_text(
                self.config_125(
                    f"rtt{rtt}/cm",
                    port=proxy.port,
                    known_hosts=where / f"known_hosts_{self.sshd.alias}",
                )
            )
            self.proxied_configs[rtt] = (ours, theirs)
            log(f"RTT {rtt} ms: delay proxy on 127.0.0.1:{proxy.port} -> sshd")
        for name in self.names:
            self.candidates[name] = getattr(self, f"_setup_{name}")()

    def config_125(
        self, control_dir: str, port: int | None = None, known_hosts: Path | None = None
    ) -> str:
        """The alias as sshpyk 1.25 wants it: ControlMaster auto, ControlPersist, ControlPath
        (it refuses to start without them), BatchMode yes; otherwise as
        tests/support/sshd.py makes it. With ``port`` (a delay proxy's) and its
        ``known_hosts``: through that proxy."""
        sshd = self.sshd
        return f"""Host {sshd.alias}
  HostName 127.0.0.1
  User {sshd.user}
  Port {port or sshd.port}
  IdentitiesOnly yes
  IdentityFile {sshd.root / "id_ed25519"}
  UserKnownHostsFile {known_hosts or sshd.known_hosts}
  BatchMode yes
  ControlMaster auto
  ControlPath {self.root / control_dir / "%C"}
  ControlPersist 10m
"""

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        data = self.root / f"jupyter-data-{name}"
        data.mkdir(exist_ok=True)
        env["JUPYTER_DATA_DIR"] = str(data)
        runtime = self.root / f"jupyter-runtime-{name}"
        runtime.mkdir(mode=0o700, exist_ok=True)  # sshpyk 1.25 fails if it does not exist
        env["JUPYTER_RUNTIME_DIR"] = str(runtime)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        # bytecode like an installed package has it, kept out of the source trees
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.root / "pycache" / name)
        env["PYTHONPATH"] = str(BENCHMARKS)
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        return env

    def _setup_local(self) -> Candidate:
        return Candidate("local", sys.executable, {"default": "python3"}, self._env("local"))

    def _setup_sshpyk(self) -> Candidate:
        env = self._env("sshpyk")
        # each driver its own login (0), or a broker of this run's, never the user's
        env["SSHPYK_SHARE_PERSIST"] = f"{self.settings.share_persist:g}"
        broker = self.root / "broker"
        broker.mkdir(mode=0o700, exist_ok=True)
        env["SSHPYK_BROKER_DIR"] = str(broker)
        kernels = {}
        variants = [("default", self.sshd.ssh_config), ("gcm", self.ssh_config_gcm)]
        variants += [(f"rtt{r}", ours) for r, (ours, _) in self.proxied_configs.items()]
        for variant, config in variants:
            name = kernels[variant] = f"bench_sshpyk_{variant}"
            add = [sys.executable, "-m", "sshpyk.cli", "add", "--kernel-name", name]
            add += ["--ssh-host-alias", self.sshd.alias, "--ssh-config", str(config)]
            add += ["--remote-python", sys.executable, "--remote-kernel-name", "python3"]
            self._run_setup(add, env, "sshpyk add")
            # remote run dirs in our temp dir, so that leftovers can be counted exactly
            spec = Path(env["JUPYTER_DATA_DIR"], "kernels", name, "kernel.json")
            data = json.loads(spec.read_text())
            data["metadata"]["kernel_provisioner"]["config"]["remote_run_root"] = str(self.run_root)
            spec.write_text(json.dumps(data, indent=1))
        return Candidate("sshpyk", sys.executable, kernels, env)

    def _setup_sshpyk125(self) -> Candidate:
        python = ensure_venv_125()
        env = self._env("sshpyk125")
        kernels = {}
        variants = [("default", self.ssh_config_125), ("gcm", self.ssh_config_125_gcm)]
        variants += [(f"rtt{r}", theirs) for r, (_, theirs) in self.proxied_configs.items()]
        for variant, config in variants:
            name = kernels[variant] = f"bench_sshpyk125_{variant}"
            add = [str(python.parent / "sshpyk"), "add", "--kernel-name", name]
            add += ["--display-name", f"bench 1.25 {variant}", "--language", "python"]
            add += ["--ssh-host-alias", self.sshd.alias, "--ssh-config", str(config)]
            add += ["--remote-python", sys.executable, "--remote-kernel-name", "python3"]
            self._run_setup(add, env, "sshpyk 1.25 add")
        return Candidate("sshpyk125", str(python), kernels, env)

    @staticmethod
    def _run_setup(cmd: list[str], env: dict[str, str], what: str) -> None:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"{what} failed: {(result.stderr or result.stdout).strip()[-500:]}")

    # running drivers
    def close_master(self) -> None:
        """Stop sshpyk 1.25's ControlMasters, if any: the next start is cold again."""
        configs = [self.ssh_config_125, self.ssh_config_125_gcm]
        configs += [theirs for _, theirs in self.proxied_configs.values()]
        for config in configs:
            subprocess.run(
                ["ssh", "-F", str(config), "-O", "exit", self.sshd.alias],
                capture_output=True,
                timeout=30,
            )

    def driver(
        self,
        name: str,
        mode: str,
        *extra: str,
        label: str = "",
        variant: str = "default",
        retry: bool = True,
        during: Callable[[DriverRun], None] | None = None,
    ) -> dict[str, Any]:
        """Run one driver process to its end; leftovers are collected afterwards.
        ``during`` is called once the driver has started (e.g. to break its link).

        A failed run is counted (and reported) and, with ``retry``, run once more."""
        handle = self.start_driver(name, mode, *extra, label=label, variant=variant)
        if during is not None:
            during(handle)
        result = self.finish_driver(handle)
        self.collect_leftovers(self.candidates[name])
        if "error" in result:
            where = f" at RTT {self.rtt} ms" if self.rtt else ""
            self.candidates[name].failures.append(f"{mode}{where}: {result['error']}")
            if retry:
                log(f"  retrying {mode} of {TITLES[name]} once")
                return self.driver(
                    name, mode, *extra, label=label, variant=variant, retry=False, during=during
                )
        return result

    def start_driver(
        self, name: str, mode: str, *extra: str, label: str = "", variant: str = "default"
    ) -> DriverRun:
        cand = self.candidates[name]
        out = self.root / f"{name}-{mode}-{time.monotonic_ns()}.json"
        logfile = self.root / f"{name}-{mode}.log"
        cmd = [cand.python, str(BENCHMARKS / "driver.py"), mode, "--kind", name]
        kernel = cand.kernels.get(variant, cand.kernels["default"])  # local: no network
        cmd += ["--kernel", kernel, "--out", str(out)]
        cmd += ["--timeout", str(self.settings.timeout)]
        cmd += ["--sshd-port", str(self.sshd.port if name != "local" else 0)]
        cmd += ["--all-root", str(self.me), "--log-level", self.settings.driver_log_level]
        cmd += ["--stacks-after", str(max(10.0, self.settings.driver_timeout - 20)), *extra]
        if name == "sshpyk125":
            self.close_master()
        with open(logfile, "a") as log_f:
            log_f.write(f"\n$ {' '.join(cmd)}\n")
            log_f.flush()
            proc = subprocess.Popen(
                cmd, env=cand.env, stdout=log_f, stderr=log_f, start_new_session=True
            )
        label = (label or mode) + ("" if variant == "default" else f" ({variant})")
        run = DriverRun(name, label, proc, out, logfile, time.monotonic())
        if variant.startswith("rtt") and name != "local":
            run.proxy = self.proxies[int(variant[3:])]
            run.counters = self.connection_counters(run.proxy)
        return run

    def connection_counters(self, proxy: DelayProxy) -> tuple[int, int, int]:
        """(connections the proxy accepted, connections it opened to sshd, connections
        sshd logged): run.py runs one proxied driver at a time, so the differences over a
        run show whether every SSH connection of it went through the proxy."""
        try:
            sshd_log = self.sshd.log_file.read_text(errors="replace")
        except OSError:
            sshd_log = ""
        return proxy.accepted, proxy.upstream_connects, sshd_log.count("Connection from ")

    def finish_driver(self, run: DriverRun) -> dict[str, Any]:
        remaining = self.settings.driver_timeout - (time.monotonic() - run.started)
        try:
            run.proc.wait(max(1.0, remaining))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(10)
        if run.name == "sshpyk125":
            self.close_master()
        result: dict[str, Any] = {}
        if run.out.exists():
            result = json.loads(run.out.read_text())
        else:
            result["error"] = f"driver gave no result (timeout {self.settings.driver_timeout:g}s?)"
        if run.proxy is not None:
            # sshd writes its log line from the forked session: give it a moment
            time.sleep(0.2)
            now = self.connection_counters(run.proxy)
            accepted, through, logged = (b - a for a, b in zip(run.counters, now, strict=True))
            result["proxy_accepted"] = accepted
            result["proxy_connections"] = through
            result["direct_connections"] = max(0, logged - through)
            if through == 0 or logged > through:
                result.setdefault(
                    "error",
                    f"not all SSH connections went through the delay proxy: it opened "
                    f"{through} to sshd, sshd logged {logged}",
                )
        if "error" in result:
            result["error"] += f" (log: {run.logfile})"
        done = "error: " + result["error"] if "error" in result else "ok"
        elapsed = time.monotonic() - run.started
        log(f"  {run.label:<16} {TITLES[run.name]:<20} {elapsed:6.1f}s {done}")
        return result

    def collect_leftovers(self, cand: Candidate, wait: float = 10.0) -> None:
        """Processes started for this candidate that are still there (e.g. a remote kernel
        nobody stopped): recorded, then killed. Only our own descendants are touched."""
        keep = {self.me}
        if self.sshd.proc is not None:
            keep.add(self.sshd.proc.pid)
        deadline = time.monotonic() + wait
        while True:
            self.reap_zombies()
            table = procstat.process_table()
            extra = [p for p in procstat.descendants(self.me, table) if p not in keep]
            extra = [p for p in extra if table[p].state != "Z"]
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in extra:
            cand.leftovers.append(table[pid].cmdline[:160])
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.reap_zombies()
        leftovers = sorted(self.run_root.iterdir()) if self.run_root.exists() else []
        for path in leftovers:
            cand.leftovers.append(f"remote run dir {path.name}")
            shutil.rmtree(path, ignore_errors=True)

    def reap_zombies(self) -> None:
        """Reap orphans reparented to us (we are a subreaper) once they exit. Only zombie
        children that no Popen waits for: at this point none is pending."""
        table = procstat.process_table()
        sshd_pid = self.sshd.proc.pid if self.sshd.proc is not None else -1
        for info in table.values():
            if info.ppid == self.me and info.state == "Z" and info.pid != sshd_pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(info.pid, os.WNOHANG)

    def stop(self) -> None:
        if "sshpyk125" in self.candidates:
            with contextlib.suppress(Exception):
                self.close_master()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.stop()
        self.sshd.stop()
        for cand in self.candidates.values():
            self.collect_leftovers(cand, wait=2.0)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="spb-"))  # short: ControlPath must fit a socket name
    try:
        yield root
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
