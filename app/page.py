"""``GET /``: a page to try the service in a browser, from the files in ``app/static``.

Plain HTML, CSS and JavaScript, committed as written (no build step, nothing from a CDN), so
the page works on an offline host. Like /docs it sits outside the API's dependencies: it opens
without an API key, and asks for one when the server says a request needs it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FILES = Path(__file__).parent / "static"
STATIC = "/static"


def install(app: FastAPI) -> None:
    """Serve the page at / and its assets under /static."""
    app.mount(STATIC, StaticFiles(directory=FILES), name="static")

    async def index(request: Request) -> FileResponse:
        return FileResponse(FILES / "index.html", media_type="text/html")

    app.add_route("/", index, include_in_schema=False)
