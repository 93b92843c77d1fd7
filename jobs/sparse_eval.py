"""Databricks task `sparse_eval`: see restpg.sparse_eval."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("sparse_eval")
