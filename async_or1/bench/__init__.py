"""The benchmarks users run (`async-or1 bench throughput | staleness`): they drive the launcher,
so they sit above it; no runtime module imports them. ``runs`` holds what both share (cells,
interleaved rounds, evaluation of a cell's model)."""
