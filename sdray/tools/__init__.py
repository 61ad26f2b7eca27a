"""Tooling beside the runtime: benchmarks (`sdray bench`) and the embedded model's training.

Nothing the runtime runs (engine, batch, serve, sweeps) imports from here; the CLI reaches in
only for `sdray bench`, and `pipelines/` scripts call it. A test holds that line.
"""
