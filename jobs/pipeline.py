"""Databricks task: the whole pipeline in one task, skipping every stage whose slice is already complete."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
