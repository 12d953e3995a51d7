"""`python -m helox.cli`: the `helox` command."""

from helox.cli import main

main()
