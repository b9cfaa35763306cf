"""Kernels through jupyter_client: lifecycle, start failures, persistent and warm spare
kernels, the acceptance scenario, many kernels under a process limit."""
