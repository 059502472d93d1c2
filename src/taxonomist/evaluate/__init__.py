"""Evaluation: metrics on numpy arrays (no torch), Kaggle-style scoring of submission files."""
