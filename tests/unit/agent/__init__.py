"""sshpyk/agent/."""
