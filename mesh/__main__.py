"""`python -m mesh`: the same command as `mesh`."""

from mesh.cli import main

main()
