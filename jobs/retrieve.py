"""Databricks task `retrieve`: top-k items of each example's own profile (dense retriever) → `retrievals`."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("retrieve")
