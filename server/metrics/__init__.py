"""Observers of the core's events: ModelStatistics (statistics.py) and Prometheus (prometheus.py)."""
