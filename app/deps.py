"""The dependencies routes receive: settings, the service, and the request's id and clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.service import CaptionService
from app.settings import Settings


def get_app_settings(request: Request) -> Settings:
    """The settings this app was created with (``create_app``)."""
    return request.app.state.settings


def get_service(request: Request) -> CaptionService:
    return request.app.state.service


def get_request_id(request: Request) -> str:
    return request.state.request_id


def get_started(request: Request) -> float:
    """When the request arrived (``time.perf_counter``), for ``timings_ms.total``."""
    return getattr(request.state, "started", None) or time.perf_counter()


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ServiceDep = Annotated[CaptionService, Depends(get_service)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
StartedDep = Annotated[float, Depends(get_started)]


def get_ready_service(service: ServiceDep) -> CaptionService:
    """The service, once the model is loaded and warm; ``NotReady`` (503) before that."""
    service.require_ready()
    return service


ReadyServiceDep = Annotated[CaptionService, Depends(get_ready_service)]


@dataclass(frozen=True)
class CaptionContext:
    """What every caption route needs besides its options."""

    request: Request
    service: CaptionService  # ready: loaded and warm
    settings: Settings
    request_id: str
    started: float  # time.perf_counter() when the request arrived


def get_caption_context(
    request: Request,
    service: ReadyServiceDep,
    settings: SettingsDep,
    request_id: RequestIdDep,
    started: StartedDep,
) -> CaptionContext:
    return CaptionContext(request, service, settings, request_id, started)


CaptionContextDep = Annotated[CaptionContext, Depends(get_caption_context)]
