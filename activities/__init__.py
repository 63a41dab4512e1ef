"""Activities: idempotent methods on classes that hold their dependencies (built in worker.py)."""
