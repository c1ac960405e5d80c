"""Metrics: counts of pushes and alert sends (in this process or in Redis), and GET /metrics for Prometheus."""
