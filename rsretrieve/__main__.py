"""`python -m rsretrieve`: the command line."""

from rsretrieve.cli import main

main()
