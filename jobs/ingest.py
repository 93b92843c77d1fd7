"""Databricks task `ingest`: ingest LongLaMP records into `examples` (bad records → `quarantine`)."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("ingest")
