"""Databricks task: reward every trajectory of one (variant, iteration) → `judge_scores`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["judge", *sys.argv[1:]]))
