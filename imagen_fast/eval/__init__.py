"""Evaluation instruments (`imagen-fast eval ...`)."""
