"""Databricks task `user_profiles`: see restpg.user_profiles."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("user_profiles")
