"""sshpyk/agent/remote/: the remote agent's modules, imported locally and driven directly."""
