"""Kernels: the launcher contract and its launchers, the local forwards, RemoteKernel
and the public SSHSession. Importing the package registers every launcher."""

from . import direct, slurm
from .launcher import LAUNCHERS, Launcher, launcher_for

__all__ = ["LAUNCHERS", "Launcher", "direct", "launcher_for", "slurm"]
