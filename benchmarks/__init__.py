"""Speed and calibration measurements: ``python -m benchmarks.bench_step ...`` or ``python benchmarks/bench_step.py ...``
(see BENCHMARKS.md)."""
