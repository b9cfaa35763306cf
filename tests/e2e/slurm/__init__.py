"""The SLURM launcher against a throwaway single-node SLURM."""
