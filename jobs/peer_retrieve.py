"""Databricks task `peer_retrieve`: see restpg.peer_retrieve."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("peer_retrieve")
