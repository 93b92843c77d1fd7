"""Databricks task: E-step, m samples per training input from θᵗ → `trajectories` (resumes a half-done slice)."""
import sys

from restpg.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
