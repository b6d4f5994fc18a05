"""Probes: liveness never touches the model; readiness is 503 until it is loaded and warm."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServiceDep
from app.errors import error_responses
from app.schemas import Status

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> Status:
    return Status(status="ok")


@router.get(
    "/health/ready",
    summary="Readiness: the model is loaded and warmed up",
    responses=error_responses("not_ready"),
)
@router.get(
    "/health",
    summary="Readiness (LitServe-style alias of /health/ready)",
    responses=error_responses("not_ready"),
)
async def ready(service: ServiceDep) -> Status:
    service.require_ready()
    return Status(status="ready")
