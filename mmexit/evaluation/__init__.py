"""Metrics, speed accounting, results tables and plots."""
