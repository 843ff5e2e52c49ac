"""The benchmarks, a package so they run as `python -m bench.<name>` and tests import them as `bench.<module>`."""
