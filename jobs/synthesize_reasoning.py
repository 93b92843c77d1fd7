"""Databricks task: the teacher writes a reasoning path per training example → `reasoning_paths`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["reason", *sys.argv[1:]]))
