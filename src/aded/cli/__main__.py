"""`python -m aded.cli`: the `aded` command without the console script."""

from aded.cli import main

main()
