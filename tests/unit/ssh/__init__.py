"""sshpyk/ssh/."""
