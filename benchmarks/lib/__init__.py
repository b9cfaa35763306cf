"""The parts of ``benchmarks/run.py``, one module per subject (imports point down only).

=============  =======================================================================
common         paths, the candidates' names and titles, ``log``, ``BenchError``
stats          ``Stat`` (median, min-max), a table cell, ratios, percentiles
proxy          ``DelayProxy``: tests/support/faultproxy.py's proxy with a latency (also
               used by ``prestart.py``), and what it delivered
settings       ``Settings``: repetitions and sizes, per RTT; the sections' names
venv125        ``benchmarks/.venv-sshpyk125``: sshpyk 1.25 from PyPI, made on first use
runner         ``Bench``: the throwaway sshd, the kernelspecs, driver processes, leftovers
report         ``Report``: the samples of one RTT and its tables; the environment lines
sections       one function per section (lifecycle, latency, reconnect, tunnel, idle,
               concurrent): run the drivers, put their samples in the report
targets        ``TARGETS``: one row per target, evaluated by ``targets_table``
kernelio       kernel_info round trips and the 20 MB cell (agent_scale, relay, slurm_relay)
=============  =======================================================================

The entry scripts put ``tests/`` (``sshd``, ``faultproxy``) and ``benchmarks/``
(``procstat``, ``tunnel``, this package) on ``sys.path`` before importing it.
"""
