"""Databricks task `sample`: E-step, m samples per training input from θᵗ → `trajectories` (resumes a half-done slice)."""
from restpg.cli import entry

if __name__ == "__main__":
    entry("sample")
