"""What every part of run.py shares: paths, the candidates, logging, the set-up error."""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["BENCHMARKS", "CANDIDATES", "GCM", "REPO", "TITLES", "BenchError", "log"]

#: benchmarks/ (driver.py, procstat.py, tunnel.py) and the repository above it
BENCHMARKS = Path(__file__).resolve().parent.parent
REPO = BENCHMARKS.parent

CANDIDATES = ("local", "sshpyk", "sshpyk125")
TITLES = {"local": "local ipykernel", "sshpyk": "sshpyk (this tree)", "sshpyk125": "sshpyk 1.25"}

#: the cipher we ask for in the "gcm" variant of the SSH candidates' ssh config
GCM = "aes128-gcm@openssh.com"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A set-up step failed; the message says which."""
