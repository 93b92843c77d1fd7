"""Databricks task: iteration-0 training sets of `sft` and `sft_reasoning` → `training_sets`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-sft", *sys.argv[1:]]))
