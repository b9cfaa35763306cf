"""The remote agent: stdlib-only modules (Python >= 3.8) sent over the SSH channel and
installed on the remote host as the package ``sshpyk_agent`` (see loader.py and
``sshpyk.agent.bundle``); imported locally only for ``protocol`` and the unit tests.

Modules, in dependency order: loader, protocol, jsonlines, procgroup, paths,
kernelspecs, launcher (the launcher contract), direct, records, agent, main; on demand
for SLURM: slurmctl, relay, slurm, node.
"""
