"""Databricks task: keep reward ≥ τ, at most N per input → `training_sets` of iteration t."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
