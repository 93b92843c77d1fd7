"""Databricks task `pat_sft`: see restpg.pat_sft."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("pat_sft")
