"""`python -m cli` = the `pipeline` console script."""

from cli.app import main

main()
