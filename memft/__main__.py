"""`python -m memft ...`, the same as the `memft` command (torchrun starts each rank this way: `-m memft`)."""

from memft.cli import main

main()
