"""The benchmarks: python -m bench (make bench); harness.py holds what they share."""
