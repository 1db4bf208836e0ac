"""What routes take from the application: the live table and the metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ember.daemon.live import LiveSandboxes
from ember.daemon.metrics import Metrics


def _live(request: Request) -> LiveSandboxes:
    live: LiveSandboxes = request.app.state.live
    return live


def _metrics(request: Request) -> Metrics:
    m: Metrics = request.app.state.metrics
    return m


Live = Annotated[LiveSandboxes, Depends(_live)]
Meter = Annotated[Metrics, Depends(_metrics)]
SandboxId = Annotated[str, "a sandbox id"]
