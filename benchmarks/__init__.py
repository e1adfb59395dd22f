"""Speed measurements of the FixMatch trainer: ``python -m benchmarks.run [--quick]``."""
