"""`python -m cli` runs the rsretrieve command."""

from cli.app import main

main()
