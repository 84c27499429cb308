"""Launching jobs: sbatch scripts, submitit submission, dry-run planning, rank entry point."""
