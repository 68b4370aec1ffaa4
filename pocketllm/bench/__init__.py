"""Building blocks of the benchmarks in `benchmarks/`: workloads, references, machine facts."""
