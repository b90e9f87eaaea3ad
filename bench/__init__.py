"""`make bench`: run as `python -m bench.run` from the repository root (set-up from testbed/)."""
