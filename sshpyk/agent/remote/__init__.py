"""The remote agent: stdlib-only modules (Python >= 3.8) sent over the SSH channel and
installed on the remote host as the package ``sshpyk_agent`` (see loader.py and
``sshpyk.agent.bundle``); imported locally only for ``protocol`` and the unit tests.

Modules, in dependency order: sshpyk.agent.bundle.CORE_MODULES (loader, protocol,
jsonlines, procgroup, paths, kernelspecs, resume, relayio, links, launcher (the
launcher contract), direct, records, spares, ports, workers, discover, owners, agent,
main); on demand, a launcher's ``remote_modules`` (sshpyk.kernels.launcher): for a
batch scheduler relay, node, batch, then the scheduler's own.
"""
