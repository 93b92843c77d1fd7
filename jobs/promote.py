"""Databricks task: move the champion/challenger aliases for a candidate policy version."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
