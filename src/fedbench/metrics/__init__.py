"""Metrics: payload bytes, rounds-to-best, evaluation helpers."""
