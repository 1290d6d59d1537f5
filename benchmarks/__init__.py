"""The benchmark scripts; run them as `python benchmarks/<script>.py` (README.md). A package so that the tests import them."""
