"""What the tests share and are not tests: throwaway servers (sshd, SLURM, network
namespaces, PAM logins, Jupyter Server), the fault proxy, a second local user, and
helpers to drive the CLI, kernels and the remote agent. Imported as ``support.*``
(pytest puts tests/ on sys.path for tests/conftest.py)."""
