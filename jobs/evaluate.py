"""Databricks task: generate on the test split and score → `eval_predictions`, `eval_scores`, `eval_summary`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
