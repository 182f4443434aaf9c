"""`python -m raylm`: the `raylm` command, where its script is not on PATH."""

from raylm.cli import main

main()
