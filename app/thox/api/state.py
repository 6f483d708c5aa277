"""What one API app holds for its lifetime, in one typed object: config,
model store, engine, service, key file, rate limiter, metrics and stored
responses. ``create_app`` builds it; the API routes and the web pages read
it through ``app_state()``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quart import Quart, current_app

if TYPE_CHECKING:  # the types only: the web pages import this module without the engine
    from ..config import Config
    from ..engine.manager import ModelManager
    from ..store import ModelStore
    from .auth import KeyFile
    from .metrics import Metrics
    from .ratelimit import RateLimiter
    from .response_store import ResponseStore
    from .service import Service

EXTENSION = "thox"


@dataclass
class AppState:
    config: Config
    store: ModelStore
    manager: ModelManager
    service: Service
    metrics: Metrics
    keys: KeyFile
    ratelimit: RateLimiter
    responses: ResponseStore        # the Responses API's stored responses
    version: str
    started: float = field(default_factory=time.time)

    def install(self, app: Quart) -> None:
        app.extensions[EXTENSION] = self


def app_state(app: Quart | None = None) -> AppState:
    """The state of ``app``, or of the app handling the current request."""
    state = (app or current_app).extensions[EXTENSION]
    assert isinstance(state, AppState)
    return state
