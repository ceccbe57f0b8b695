"""Dependencies the routers receive from the app state (never module globals)."""

from __future__ import annotations

from fastapi import Request

from gateway.config import Settings
from gateway.store.store import InstanceStore


def get_store(request: Request) -> InstanceStore:
    """The instance store of the running gateway."""
    store: InstanceStore = request.app.state.store
    return store


def get_settings_dep(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings
