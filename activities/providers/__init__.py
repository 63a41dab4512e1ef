"""Platform providers: one module per platform, one registration line in `registry.py`."""
