"""``benchmarks/.venv-sshpyk125``: sshpyk 1.25 from PyPI, the old column's interpreter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .common import BENCHMARKS, BenchError, log

__all__ = ["OLD_VERSION", "VENV_125", "ensure_venv_125"]

VENV_125 = BENCHMARKS / ".venv-sshpyk125"
OLD_VERSION = "1.25"


def ensure_venv_125() -> Path:
    """benchmarks/.venv-sshpyk125 with sshpyk 1.25, reused when already right.

    jupyter_client and pyzmq are pinned to this interpreter's versions so that the only
    difference between the drivers is the provisioner.
    """
    python = VENV_125 / "bin" / "python"
    probe = (
        "import importlib.metadata as m; print(m.version('sshpyk'), m.version('jupyter_client'))"
    )
    import jupyter_client
    import zmq

    want = f"{OLD_VERSION} {jupyter_client.__version__}"
    if python.exists():
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == want:
            return python
        log(
            f"{VENV_125} is not as expected "
            f"({found.stdout.strip() or found.stderr[-200:]}); rebuilding"
        )
        shutil.rmtree(VENV_125)
    log(f"creating {VENV_125} with sshpyk=={OLD_VERSION} from PyPI")
    subprocess.run([sys.executable, "-m", "venv", str(VENV_125)], check=True)
    pins = [
        f"sshpyk=={OLD_VERSION}",
        f"jupyter_client=={jupyter_client.__version__}",
        f"pyzmq=={zmq.__version__}",
    ]
    result = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", *pins], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise BenchError(f"pip install {' '.join(pins)} failed: {result.stderr.strip()[-500:]}")
    return python
