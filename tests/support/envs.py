"""Remote environments for the discovery tests (sshpyk/agent/remote/discover.py): real
venvs of this Python (``--system-site-packages``: ipykernel and bash_kernel are this
Python's), one of them with bash_kernel's kernelspec installed into it, a conda-style
env (``conda-meta/``), and a Python that never answers."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Envs:
    venv_a: Path
    venv_b: Path  # has the bash kernelspec
    conda_env: Path  # a conda-style env, listed in home/.conda/environments.txt

    def python(self, env: Path) -> str:
        return str(env / "bin" / "python3")


def make_venv(path: Path) -> Path:
    """A venv of this Python that sees its packages (ipykernel), without pip: fast."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
        check=True,
        timeout=60,
    )
    return path


def make_envs(home: Path, search_root: Path) -> Envs:
    """Two venvs under ``search_root`` (one a project's ``.venv``), bash_kernel's
    kernelspec in the second, and a conda-style env outside it, listed in
    ``home/.conda/environments.txt`` as conda does."""
    pytest.importorskip("bash_kernel")  # the dev extra
    venv_a = make_venv(search_root / "venv-a")
    venv_b = make_venv(search_root / "project-b" / ".venv")
    subprocess.run(
        [str(venv_b / "bin" / "python"), "-m", "bash_kernel.install", "--sys-prefix"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert (venv_b / "share" / "jupyter" / "kernels" / "bash" / "kernel.json").is_file()
    conda_env = make_venv(home / "data" / "conda" / "envs" / "cenv")
    (conda_env / "conda-meta").mkdir()
    (conda_env / "conda-meta" / "history").write_text("")
    (home / ".conda").mkdir(parents=True, exist_ok=True)
    (home / ".conda" / "environments.txt").write_text(f"{conda_env}\n/nowhere/gone\n")
    return Envs(venv_a, venv_b, conda_env)


def make_silent_python(env: Path, pid_file: Path) -> Path:
    """An env whose python never answers (a hung file system, say): it writes its pid
    and sleeps."""
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text("home = /nowhere\n")
    python = env / "bin" / "python3"
    python.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 120\n")
    python.chmod(0o755)
    return python


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
