"""A daemon started on demand does not stop while work is in progress: a request being
answered, a template job whose client left. The supervisor (real, on a real SQLite home)
counts it idle only once nothing holds the daemon's activity."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from ember.daemon.activity import Activity
from ember.daemon.middleware import EdgeMiddleware
from ember.daemon.routes_templates import template_job_events
from ember.paths import Paths
from ember.runtime import reaper
from ember.sdk.results import TemplateInfo


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[Paths]:
    yield Paths(home=tmp_path / "home", cache=tmp_path / "cache",
                ram=tmp_path / "ram").ensure()


def _supervised(paths: Paths, activity: Activity) -> tuple[threading.Event, threading.Thread]:
    ended, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=reaper.supervise, args=(paths, stop, ended.set),
                         kwargs={"idle_exit": 0.4, "busy": activity.busy}, daemon=True)
    t.start()
    return ended, t


def test_the_supervisor_waits_while_work_is_held(paths: Paths) -> None:
    activity = Activity()
    with activity.hold():
        ended, t = _supervised(paths, activity)
        assert not ended.wait(2.0)  # five idle periods: held, so not idle
    assert ended.wait(10.0)  # released: it stops after its idle period
    t.join(5)


def test_an_idle_daemon_stops(paths: Paths) -> None:
    ended, t = _supervised(paths, Activity())
    assert ended.wait(10.0)
    t.join(5)


def test_a_request_holds_the_activity_while_it_runs() -> None:
    seen: list[bool] = []
    activity = Activity()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(activity.busy())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def go() -> int:
        transport = httpx.ASGITransport(app=EdgeMiddleware(app, activity))
        async with httpx.AsyncClient(transport=transport, base_url="http://emberd") as c:
            return (await c.get("/v1/health")).status_code

    assert asyncio.run(go()) == 200
    assert seen == [True] and not activity.busy()


def test_a_template_job_holds_it_after_its_client_left() -> None:
    activity = Activity()

    async def go() -> tuple[bool, bool]:
        release = asyncio.Event()

        async def job(progress: object) -> TemplateInfo:
            await release.wait()
            raise RuntimeError("done")

        response = template_job_events("t", job, activity)
        await asyncio.sleep(0)  # the job started; nobody reads its events
        during = activity.busy()
        release.set()
        for _ in range(100):
            if not activity.busy():
                break
            await asyncio.sleep(0.01)
        del response
        return during, activity.busy()

    assert asyncio.run(go()) == (True, False)



def test_the_apps_lifespan_is_not_work_in_progress(paths: Paths) -> None:
    """The lifespan scope passes the edge for the app's whole life (as uvicorn drives
    it): it holds nothing, so a started daemon can still be idle."""
    from ember.daemon.app import create_app

    app = create_app(paths)

    async def go() -> tuple[bool, list[str]]:
        inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        sent: list[str] = []

        async def send(msg: Message) -> None:
            sent.append(msg["type"])

        await inbox.put({"type": "lifespan.startup"})
        life = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         inbox.get, send))
        for _ in range(500):
            if sent:
                break
            await asyncio.sleep(0.01)
        busy = app.state.live.activity.busy()
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(life, 30)
        return busy, sent

    assert asyncio.run(go()) == (False, ["lifespan.startup.complete",
                                         "lifespan.shutdown.complete"])
