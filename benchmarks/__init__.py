"""Benchmarks: scripts that print a markdown table and can write it to a file (see RESULTS.md)."""
