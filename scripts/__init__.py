"""Developer tools run from the repository root as modules: python -m scripts.bench, scripts.bench_watch, ..."""
