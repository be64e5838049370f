"""Switchyard benchmark suite: see bench/README.md. Entry point: bench/run."""
