"""Escalator's benchmarks (not tests): `python -m bench` / `make bench`.

Each section is a module of this package with `def run(ctx: BenchContext) -> dict`; the runner
(`bench.common`) starts one broker, runs the selected sections, merges their results into
`bench/results/latest.json` and prints a markdown table. See bench/README.md.
"""
