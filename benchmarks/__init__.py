"""fundl's benchmarks: ``python -m benchmarks --suite mlp`` (see ``harness.py``)."""
