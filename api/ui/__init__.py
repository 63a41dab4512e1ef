"""The web dashboard (issue 18), served by the API process at `/ui/`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from api.ui.routes import router


def install(app: FastAPI) -> None:
    """Mount the pages and their vendored CSS and JS (no CDN, no build step)."""
    app.include_router(router)
    app.mount(
        "/ui/static",
        StaticFiles(directory=Path(__file__).parent / "static"),
        name="ui-static",
    )
