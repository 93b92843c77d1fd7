"""Databricks task `filtering`: keep reward ≥ τ, at most N per input → `training_sets` of iteration t."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("filtering")
