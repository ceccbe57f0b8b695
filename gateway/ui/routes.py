"""The web UI added to the app: its routers, the static files and ``/docs``, and errors as pages for ``/ui``."""

from __future__ import annotations

import importlib
import importlib.util

from fastapi import APIRouter, FastAPI

from gateway.ui import assets, destinations, job, jobs, login, models, overview, studies, workers

#: The UI's routers, in the order they are matched.
ROUTERS: tuple[APIRouter, ...] = (
    assets.router,
    login.router,
    overview.router,
    jobs.router,
    job.router,
    studies.router,
    models.router,
    destinations.router,
    workers.router,
)


def routers() -> list[APIRouter]:
    """Every router of the UI, the radiologist's results page included once its module is there."""
    found = list(ROUTERS)
    if importlib.util.find_spec("gateway.ui.results") is not None:
        found.append(importlib.import_module("gateway.ui.results").router)
    return found


def include_ui(app: FastAPI) -> None:
    """Add the UI's routes to ``app`` (its error handlers are added by the app factory, :func:`errors.pages_too`)."""
    for router in routers():
        app.include_router(router)
