"""Databricks task: is the reward fit to train on? (shuffled-profile and direct checks) → `reward_validation`."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate-reward", *sys.argv[1:]]))
