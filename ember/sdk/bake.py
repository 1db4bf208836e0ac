"""Pre-baked templates: boot a template once, run a setup command, snapshot the result.

``ember image bake NAME --from BASE --run CMD`` registers template NAME whose sandboxes are
restored from that snapshot instead of booting: installed packages, warmed caches and any
processes the setup left running are there from the first millisecond.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ember.errors import BadRequestError, TemplateNotFoundError
from ember.paths import Paths
from ember.sdk.async_sandbox import AsyncSandbox, manager
from ember.sdk.portal import portal
from ember.sdk.process import OutputCallback
from ember.sdk.results import CommandFailedError
from ember.store import Store, TemplateRecord

BAKE_TIMEOUT_S = 3600.0


async def bake_template(name: str, base: str, setup: str | None, *, vcpus: int = 1,
                        memory_mib: int = 256, disk_mib: int | None = None,
                        setup_timeout: float = BAKE_TIMEOUT_S, replace: bool = False,
                        on_output: OutputCallback | None = None,
                        on_progress: Callable[[str], None] | None = None,
                        paths: Paths | None = None) -> TemplateRecord:
    """Create template ``name`` from ``base`` plus ``setup`` (a shell command that must
    exit 0), as a snapshot that sandboxes of ``name`` are restored from."""
    mgr = manager(paths)
    if name == base:
        raise BadRequestError("a baked template needs a new name")
    base_rec = mgr.store.get_template(base)
    if base_rec.config.get("snapshot"):
        raise BadRequestError(f"template {base!r} is baked already; bake from its base "
                              f"{base_rec.config.get('base')!r}")
    old = _template_or_none(mgr.store, name)
    if old is not None and not replace:
        raise BadRequestError(f"template {name!r} exists already (use --force)")
    async with await AsyncSandbox.create(base, vcpus=vcpus, memory_mib=memory_mib,
                                         disk_mib=disk_mib, timeout=None,
                                         on_progress=on_progress, paths=paths) as sb:
        if setup:
            if on_progress:
                on_progress(f"running setup: {setup}")
            result = await sb.exec(setup, timeout=setup_timeout, on_stdout=on_output,
                                   on_stderr=on_output)
            if result.exit_code != 0:
                raise CommandFailedError(result)
        if on_progress:
            on_progress("snapshotting")
        snap = await sb.snapshot()
    rec = TemplateRecord(
        name=name, source=f"bake:{base}", digest=base_rec.digest,
        image_path=base_rec.image_path, size_bytes=base_rec.size_bytes,
        created_at=time.time(),
        config={**base_rec.config, "snapshot": snap.id, "base": base, "setup": setup or "",
                "vcpus": snap.vcpus, "memory_mib": snap.memory_mib, "disk_mib": snap.disk_mib})
    mgr.store.put_template(rec, replace=replace)
    if old is not None and old.config.get("snapshot") and old.config["snapshot"] != snap.id:
        mgr.collect_snapshot(str(old.config["snapshot"]))
    return rec


def _template_or_none(store: Store, name: str) -> TemplateRecord | None:
    try:
        return store.get_template(name)
    except TemplateNotFoundError:
        return None


def bake_template_sync(*args: object, **kwargs: object) -> TemplateRecord:
    return portal().call(bake_template(*args, **kwargs))  # type: ignore[arg-type]
