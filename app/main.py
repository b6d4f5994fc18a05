"""``create_app()``: the FastAPI app over one ``Captioner``.

The model loads in the lifespan, in the background: /health/live answers at once, and
/health/ready (and every model route) says 503 ``not_ready`` until loading and warm-up are done.
One process holds one model; scale out with replicas, not workers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI

from app import docs, errors, page
from app.auth import require_api_key
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.routes import captions, health, models
from app.routes import metrics as metrics_route
from app.service import CaptionService
from app.settings import Settings, get_settings
from captioner import __version__

DESCRIPTION = """Image and video captioning over HTTP, with dynamic batching.

Every error is `{"error": {"type", "message", "param"}}`; the types:

| type | status | meaning |
|---|---|---|
""" + "\n".join(
    f"| `{name}` | {kind.status} | {kind.description} |"
    for name, kind in errors.ERROR_TYPES.items()
)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` defaults to the environment's (``get_settings``)."""
    settings = settings or get_settings()
    metrics = Metrics()
    service = CaptionService(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.start(), name="load-model")
        try:
            yield
        finally:
            if not loading.done():
                service.begin_drain()
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await service.close()

    app = FastAPI(
        title="captioner",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(require_api_key)],
        docs_url=None,  # served below from local files: self-hosted machines are often offline
    )
    docs.install(app)
    page.install(app)
    docs.describe_auth(app, settings)
    app.state.service = service
    # Routes read these through app.deps. Not a dependency override: with any override set,
    # FastAPI re-inspects every route's dependencies on every request (about 10% of the event
    # loop's time under load, measured with py-spy).
    app.state.settings = settings
    errors.install(app, retry_after_s=settings.retry_after_s)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        access_log=settings.access_log,
        body_timeout_s=settings.body_timeout_s,
        body_idle_timeout_s=settings.body_idle_timeout_s,
    )
    for router in (captions.router, models.router, health.router, metrics_route.router):
        app.include_router(router)
    return app
