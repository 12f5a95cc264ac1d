"""Benchmarks of the text-to-image service (DESIGN.md section 8); figures live in ``bench/RESULTS.md``."""
