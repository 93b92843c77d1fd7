"""Databricks task: train the policy on one (variant, iteration) slice of `training_sets`; registers a model version."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
