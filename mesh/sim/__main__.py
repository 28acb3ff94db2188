"""`python -m mesh.sim`: the `mesh sim` commands without the rest of the CLI."""

import sys

from mesh.sim.command import main

if __name__ == "__main__":
    sys.exit(main())
