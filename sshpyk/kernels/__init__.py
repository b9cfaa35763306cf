"""Kernels: the launcher contract and its launchers, the local forwards, RemoteKernel
and the public SSHSession. Importing the package registers every launcher."""

# the launchers: importing a launcher's module registers it (its one line here)
from . import direct, sge, slurm  # noqa: F401
from .launcher import LAUNCHERS, Launcher, launcher_for

__all__ = ["LAUNCHERS", "Launcher", "launcher_for"]
