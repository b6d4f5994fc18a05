"""The one ASGI middleware: request ids, access logs, request metrics, body-read timeouts, and
the last-resort 500.

It is plain ASGI (no BaseHTTPMiddleware) so that bodies stream through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import logs
from app.errors import GENERIC_500, ApiError
from app.metrics import Metrics

access_log = logging.getLogger("captioner.access")
log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


def request_id_from(headers: Headers) -> str:
    """The client's X-Request-ID when it is short and plain, else a fresh one."""
    sent = headers.get(REQUEST_ID_HEADER, "")
    return sent if _SANE_ID.fullmatch(sent) else uuid.uuid4().hex


def _route_path(scope: Scope, arrived: Scope) -> str:
    """The path template of the route that served a request (a bounded label), or "unmatched".

    FastAPI records its API routes in the scope; plain Starlette routes (/, /docs,
    /openapi.json) and mounted static folders (labelled by their folder) do not, so those are
    matched here, against the scope as it ``arrived``: a mount rewrites the live one's root_path.
    """
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in scope["app"].routes if r.matches(arrived)[0] is Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


def timed_receive(receive: Receive, *, started: float, total_s: float, idle_s: float) -> Receive:
    """``receive``, raising a 408 ``body_timeout`` when the body is not in by ``started +
    total_s``, or pauses longer than ``idle_s``; once the body is in, it waits as long as it
    takes (for a disconnect)."""
    body_done = False

    async def receive_within() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        wait = min(idle_s, started + total_s - time.perf_counter())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                message = await receive()
        except TimeoutError:
            raise ApiError(
                "body_timeout",
                f"the request body did not arrive in time (at most {total_s:g} s in all, "
                f"pauses of at most {idle_s:g} s)",
                headers={"Connection": "close"},  # the rest of the body is never read
            ) from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return receive_within


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        access_log: bool = True,
        body_timeout_s: float = 300.0,
        body_idle_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.body_timeout_s = body_timeout_s
        self.body_idle_timeout_s = body_idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        arrived = dict(scope)
        request_id = request_id_from(Headers(scope=scope))
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, started
        token = logs.request_id.set(request_id)
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        receive = timed_receive(
            receive, started=started, total_s=self.body_timeout_s, idle_s=self.body_idle_timeout_s
        )
        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            status = CLIENT_CLOSED
        except ApiError as exc:  # a body timeout where no exception handler runs
            state["error_type"] = exc.type
            if response_started:
                raise
            await exc.response()(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            state["error_type"] = "internal_error"
            if response_started:
                raise
            await ApiError("internal_error", GENERIC_500).response()(scope, receive, send_with_id)
        finally:
            self.metrics.in_progress.dec()
            self._record(scope, arrived, request_id, status, time.perf_counter() - started)
            logs.request_id.reset(token)

    def _record(
        self, scope: Scope, arrived: Scope, request_id: str, status: int, seconds: float
    ) -> None:
        endpoint = _route_path(scope, arrived)
        self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.metrics.request_duration.labels(endpoint=endpoint).observe(seconds)
        error_type = scope["state"].get("error_type")
        if error_type:
            self.metrics.failures.labels(reason=error_type).inc()
        if self.access_log:
            client = scope.get("client")
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "client": client[0] if client else None,
                    "error_type": error_type,
                },
            )
