"""Databricks task `judge`: reward every trajectory of one (variant, iteration) → `judge_scores`."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("judge")
