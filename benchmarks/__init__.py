"""Side-by-side benchmarks of prefopt and TRL: ``python -m benchmarks [--quick | --gpu]`` (see docs/benchmarks.md)."""
