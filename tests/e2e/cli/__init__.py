"""The `sshpyk` command line against a real sshd."""
