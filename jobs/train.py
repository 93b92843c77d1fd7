"""Databricks task `train`: train the policy on one (variant, iteration) slice of `training_sets`; registers a model version."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("train")
