"""Building blocks of the benchmarks in `benchmarks/` that the package itself never uses (the
core must not import this package: tests/test_layers.py): the machine a benchmark ran on."""
