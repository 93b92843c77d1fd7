"""Databricks task `generate`: the champion policy's personalized outputs for a table of requests."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("generate")
