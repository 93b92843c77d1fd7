"""Databricks task `pipeline`: the whole run in one task, skipping every stage whose slice is already complete."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("pipeline")
