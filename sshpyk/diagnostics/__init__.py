"""Diagnostics: ``sshpyk check``'s stages (:mod:`.check`), ``sshpyk list``'s live checks
(:mod:`.live`) and its formatting (:mod:`.listing`), and the kernels running on hosts
for ``sshpyk ps``/``kill`` (:mod:`.inventory`)."""
