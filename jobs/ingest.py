"""Databricks task: ingest LongLaMP records into `examples` (bad records → `quarantine`)."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
