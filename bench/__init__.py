"""Benchmarks of nhi-lifecycle against the dev-mode services (`python -m bench`, `make bench`).

Each benchmark starts its own Temporal dev server, Postgres database, moto server, worker and
API on free loopback ports, measures, writes `bench/results/<name>.{json,md,png}`, and stops
everything it started. See `bench/README.md`.
"""
