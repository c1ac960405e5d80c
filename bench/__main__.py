"""`python -m bench` (make bench): the fan-out benchmark and its other scenarios; see bench/fanout.py."""
from bench.fanout import main

main()
