"""A real Jupyter Server (or JupyterLab) process on 127.0.0.1 for the client tests.

It runs with the test's environment (so it sees the isolated ``JUPYTER_DATA_DIR``
where ``make_kernelspec`` wrote the SSH kernelspec), plus private config, runtime and
JupyterLab settings dirs, a random token, and its whole log in one file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["JupyterServer", "ServerStartError", "artifacts_dir"]

ARTIFACTS_ENV = "SSHPYK_ARTIFACTS"


class ServerStartError(RuntimeError):
    pass


def artifacts_dir() -> Path:
    """Where tests leave screenshots and logs: $SSHPYK_ARTIFACTS or tests/artifacts/."""
    path = Path(os.environ.get(ARTIFACTS_ENV) or Path(__file__).parents[1] / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


class JupyterServer:
    """``python -m <app>`` (``jupyter_server`` or ``jupyterlab``) on a free loopback port."""

    def __init__(
        self,
        root: Path,
        *,
        app: str = "jupyter_server",
        debug: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.root = root
        self.app = app
        self.debug = debug
        self.config = config or {}  # written to jupyter_server_config.json
        self.config_dir = root / "config"
        self.token = secrets.token_hex(24)
        self.notebook_dir = root / "notebooks"
        self.log_file = root / "server.log"
        self.runtime_dir = Path(os.environ.get("JUPYTER_RUNTIME_DIR") or root / "runtime")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)  # JUPYTER_DATA_DIR etc. from the test's fixtures
        env.update(
            {
                "JUPYTER_CONFIG_DIR": str(self.config_dir),
                "JUPYTER_RUNTIME_DIR": str(self.runtime_dir),
                "JUPYTERLAB_SETTINGS_DIR": str(self.root / "lab-settings"),
                "JUPYTERLAB_WORKSPACES_DIR": str(self.root / "lab-workspaces"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            self.app,
            "--no-browser",
            "--allow-root",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0",  # the server binds port 0 and writes the real port out
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.notebook_dir}",
        ]
        if self.app == "jupyterlab":  # no calls to the internet from a test
            argv += [
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ]
        if self.debug:
            argv.append("--debug")
        return argv

    def _quiet_lab_settings(self) -> None:
        """No "get Jupyter news?" toast over the notebook, no update checks."""
        settings = self.root / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )

    def start(self, timeout: float = 60.0) -> JupyterServer:
        self.notebook_dir.mkdir(parents=True, exist_ok=True)
        self.config_dir.mkdir(parents=True, exist_ok=True)
        if self.config:
            (self.config_dir / "jupyter_server_config.json").write_text(json.dumps(self.config))
        if self.app == "jupyterlab":
            self._quiet_lab_settings()
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                env=self.env(),
                cwd=self.notebook_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        info_file = self.runtime_dir / f"jpserver-{self.proc.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"{self.app} exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
                )
            if info_file.exists():
                try:
                    self.port = int(json.loads(info_file.read_text())["port"])
                    self.api("GET", "/api/status", timeout=5)
                    return self
                except (ValueError, KeyError, OSError):
                    pass  # file half written, or not serving yet
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"{self.app} did not serve within {timeout:g}s:\n{self.log_text()}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """One authenticated REST call; returns the decoded JSON reply (None when empty)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            raw = reply.read()
        return json.loads(raw) if raw.strip() else None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """Shut down through the REST API (the server stops its kernels), then wait."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None and self.port:
            try:
                self.api("POST", "/api/shutdown", timeout=10)
            except (OSError, urllib.error.URLError):
                pass  # already going away
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode
