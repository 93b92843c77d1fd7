"""Databricks task `evaluate`: generate on the evaluation split and score → `eval_*`; publishes `candidate_version`."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("evaluate")
