"""The SSH layer: ssh config -> connection options (hosts), host key errors (hostkeys),
ProxyJump chains (jump), shared connections (pool) and the connection handle (session).

It imports only :mod:`sshpyk.errors` from the rest of sshpyk; agents and kernels are
built on top of it and keep their per-connection state in the pool's ``services``.
"""
