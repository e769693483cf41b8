"""`python -m leakaudit` is the same as the `leakaudit` command."""

from leakaudit.cli import main

main()
