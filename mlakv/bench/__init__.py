"""mlakv benchmarks: providers side by side (the legacy baseline lives only here)."""
