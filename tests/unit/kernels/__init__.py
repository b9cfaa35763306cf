"""sshpyk/kernels/."""
