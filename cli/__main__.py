"""`python -m rsretrieve.cli`."""

from rsretrieve.cli import main

main()
