"""Databricks task `reason`: the teacher writes a reasoning path per training input → `reasoning_paths`."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("reason")
