"""Databricks task `sft_data`: iteration-0 training sets of `sft` and `sft_reasoning` → `training_sets`."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("sft_data")
