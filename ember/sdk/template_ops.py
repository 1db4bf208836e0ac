"""Templates from the SDK: what ``AsyncSandbox.build_template`` / ``list_templates`` /
``delete_template`` do, in this process (``EMBER_LOCAL=1``, and the daemon) or through a
daemon (the build's progress streamed as NDJSON events)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ember.errors import ProtocolError
from ember.sdk.results import TemplateInfo, TemplateSnapshotInfo
from ember.store import TemplateRecord

if TYPE_CHECKING:
    from ember.runtime.manager import SandboxManager
    from ember.sdk.remote import Transport


def info(rec: TemplateRecord, snaps: Sequence[TemplateSnapshotInfo] = ()) -> TemplateInfo:
    return TemplateInfo(name=rec.name, source=rec.source, digest=rec.digest,
                        size_bytes=rec.size_bytes, created_at=rec.created_at,
                        config=dict(rec.config), snapshots=list(snaps))


def snapshots_here(mgr: SandboxManager, template: str | None = None
                   ) -> dict[str, list[TemplateSnapshotInfo]]:
    """The template snapshots (of ``template``) by template name, newest first."""
    from ember.runtime import template_snapshots

    out: dict[str, list[TemplateSnapshotInfo]] = {}
    for s in template_snapshots.all_of(mgr, template):
        out.setdefault(s.template, []).append(TemplateSnapshotInfo(
            id=s.id, vcpus=s.vcpus, memory_mib=s.memory_mib, disk_mib=s.disk_mib,
            size_bytes=s.size_bytes, created_at=s.created_at,
            current=template_snapshots.is_current(mgr, s)))
    return out


def drop_snapshots_here(mgr: SandboxManager, template: str) -> list[str]:
    """Remove the template snapshots of ``template``; those that live sandboxes use are
    kept. Returns the ids removed."""
    from ember.runtime import template_snapshots

    mgr.store.get_template(template)  # TemplateNotFoundError
    removed, _ = template_snapshots.remove_all(mgr, template)
    return removed


def build_here(mgr: SandboxManager, name: str, source: str | None, *,
               packages: Sequence[str], force: bool, rebuild: bool, free_mib: int,
               progress: Callable[[str], None] | None) -> TemplateInfo:
    """Build and register template ``name`` (blocking: minutes for a Debian build)."""
    from ember.guest.image import build_image
    from ember.runtime import template_snapshots

    rec = build_image(mgr.paths, mgr.store, name, source, packages=packages, force=force,
                      rebuild=rebuild, free_mib=free_mib, progress=progress)
    template_snapshots.collect(mgr, name)  # a rebuilt template's old snapshots
    return info(rec, snapshots_here(mgr, name).get(name, ()))


def remove_here(mgr: SandboxManager, name: str) -> None:
    """Remove template ``name`` (refused while sandboxes use it); a baked template's
    snapshot goes with it unless still in use."""
    from ember.guest.image import remove_image
    from ember.runtime import template_snapshots

    snapshot = mgr.store.get_template(name).config.get("snapshot")
    remove_image(mgr.paths, mgr.store, name)
    if snapshot:
        mgr.collect_snapshot(str(snapshot))
    template_snapshots.remove_all(mgr, name)  # no sandbox uses the template any more


def list_here(mgr: SandboxManager) -> list[TemplateInfo]:
    snaps = snapshots_here(mgr)
    return [info(r, snaps.get(r.name, ())) for r in mgr.store.list_templates()]


async def build_remote(t: Transport, body: dict[str, Any],
                       progress: Callable[[str], None] | None) -> TemplateInfo:
    r = await t.stream("POST", "/templates", json=body)
    return await template_events(r, progress, f"the build of {body.get('name')!r}")


async def template_events(r: Any, progress: Callable[[str], None] | None,
                          what: str) -> TemplateInfo:
    """Read a daemon's NDJSON answer about a template (a build, a pull): its progress
    lines to ``progress``, its error raised, its result returned; ``r`` is closed."""
    from ember.sdk import wire

    try:
        async for line in r.aiter_lines():
            if not line:
                continue
            ev = wire.parse_event(line.encode())
            if ev["event"] == "progress" and progress is not None:
                progress(str(ev.get("message", ""))[:2000])
            elif ev["event"] == "error":
                raise wire.error_for_event(ev)
            elif ev["event"] == "done":
                return wire.template_info(ev.get("template"))
    finally:
        await r.aclose()
    raise ProtocolError(f"the daemon ended {what} without a result")


async def list_remote(t: Transport) -> list[TemplateInfo]:
    from ember.sdk.wire import template_info

    return [template_info(i) for i in await t.call("GET", "/templates")]


async def remove_remote(t: Transport, name: str) -> None:
    await t.call("DELETE", "/templates/" + quote(name, safe=""))


async def drop_snapshots_remote(t: Transport, template: str) -> list[str]:
    got = await t.call("DELETE", "/templates/" + quote(template, safe="") + "/snapshots")
    removed = got.get("removed") if isinstance(got, dict) else None
    if not isinstance(removed, list) or not all(isinstance(i, str) for i in removed):
        raise ProtocolError("malformed answer to a template snapshot removal")
    return removed
