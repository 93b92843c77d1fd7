"""Databricks task `promote`: score candidate and champion on the promotion split and move the aliases."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("promote")
