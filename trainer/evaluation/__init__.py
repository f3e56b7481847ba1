"""Evaluation of generated images."""
