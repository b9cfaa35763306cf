"""End to end: real OpenSSH sshds on this host (which is also "the remote"), by subject."""
