"""``python -m sshpyk.cli``: the ``sshpyk`` command."""

import sys

from . import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog_name="sshpyk"))
