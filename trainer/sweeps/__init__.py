"""Hyperparameter sweeps: trial records, the end-of-sweep summary, the resumable Optuna sweeper."""
