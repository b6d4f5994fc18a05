"""``/docs``: Swagger UI from the files of the ``swagger-ui-bundle-v2`` package, not a CDN.

FastAPI's default /docs page loads Swagger UI from jsDelivr, so on an offline or air-gapped
host (where people self-host models) it is a blank page. Here the same page is built with
FastAPI's own helper, pointing at the package's copy served under /docs/static.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from app.errors import ERROR_TYPES, ApiError
from app.settings import Settings

STATIC = "/docs/static"


def install(app: FastAPI) -> None:
    """Serve /docs and its assets from this server.

    Plain routes, as FastAPI's own docs routes are: outside the API's dependencies, so the page
    opens without an API key (and takes one in its Authorize dialog).
    """
    app.mount(STATIC, StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC}/favicon-32x32.png",
            oauth2_redirect_url="/docs/oauth2-redirect",
        )

    async def swagger_ui_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route("/docs/oauth2-redirect", swagger_ui_redirect, include_in_schema=False)


def describe_auth(app: FastAPI, settings: Settings) -> None:
    """Make /openapi.json say what this server's key check does, as configured.

    FastAPI marks every operation as needing the bearer key, since the check is an app-wide
    dependency. Without keys nothing needs one; with keys, the exempt paths (probes, metrics)
    need none, and every other operation may answer 401.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _shape_security(generate(), settings)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _shape_security(schema: dict[str, Any], settings: Settings) -> None:
    unauthorized = {
        "description": f"`unauthorized`: {ERROR_TYPES['unauthorized'].description}",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"},
                "example": ApiError("unauthorized", "the API key is not valid").body(),
            }
        },
    }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if not settings.api_keys or path in settings.auth_exempt_paths:
                operation.pop("security", None)
                operation["responses"].pop("401", None)
            else:
                operation["responses"].setdefault("401", unauthorized)
    if not settings.api_keys:
        schema.get("components", {}).pop("securitySchemes", None)
