"""Databricks task `validate_reward`: is the reward fit to train on? Fails the job with the numbers when it is not."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("validate_reward")
