"""The unit tier: no sshd, laid out like the sshpyk package (``scripts/test tests/unit``)."""
