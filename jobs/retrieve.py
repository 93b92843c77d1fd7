"""Databricks task: top-k profile items per example (dense retriever) → `retrievals`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrieve", *sys.argv[1:]]))
