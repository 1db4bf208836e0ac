"""Save and load a QEMU guest's state with the migration stream, over file descriptors.

Save: pause the vCPUs, then ``migrate`` to a file descriptor handed over QMP (SCM_RIGHTS
and ``getfd``), so QEMU needs neither a path nor a helper process. With the
``x-ignore-shared`` capability, guest RAM that is file-backed and shared is not written
to the stream (the caller copies the file); anything else is. When the migration
completes QEMU has flushed and released the disk, so its overlay can be copied.

Load: a QEMU started with ``-incoming defer`` gets the state file's descriptor the same
way and ``migrate-incoming``; RAM mapped privately from a snapshot's RAM file is then
shared copy-on-write with every other guest restored from it.

Everything QEMU reports here is checked: a stream it rejects (corrupt, truncated, from
another QEMU build, kernel or device model) makes it exit; we report that, by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ember.errors import EmberTimeoutError, EngineError

POLL_S = 0.002
#: QEMU's default migration bandwidth cap (128 MiB/s in 7.2) would make a local save slow.
UNLIMITED_BANDWIDTH = 1 << 40


async def _session(socket_path: Path, who: str, timeout: float) -> QMPClient:
    client = QMPClient(who)
    try:
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
    except (QMPError, OSError, EOFError, TimeoutError) as err:
        raise EngineError(f"{who}: cannot connect to QMP at {socket_path}: {err}") from err
    return client


async def _execute(client: QMPClient, who: str, cmd: str,
                   args: dict[str, Any] | None = None) -> Any:
    try:
        return await client.execute(cmd, args)
    except ExecuteError as err:
        raise EngineError(f"{who}: QMP {cmd} failed: {err}") from err
    except (QMPError, OSError, EOFError) as err:
        raise EngineError(f"{who}: QMP {cmd} was interrupted (did QEMU exit?): {err!r}") from err


async def _pass_fd(client: QMPClient, who: str, fd: int, name: str) -> None:
    try:
        client.send_fd_scm(fd)
    except (QMPError, OSError) as err:
        raise EngineError(f"{who}: cannot pass a file descriptor to QEMU: {err}") from err
    await _execute(client, who, "getfd", {"fdname": name})


async def _capabilities(client: QMPClient, who: str) -> None:
    await _execute(client, who, "migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})


async def save_state(socket_path: Path, dest: Path, *, who: str,
                     timeout: float) -> tuple[dict[str, Any], str]:
    """Pause the guest and write its state to ``dest``; return (migration stats, version)."""
    client = await _session(socket_path, who, timeout)
    try:
        return await asyncio.wait_for(_save(client, dest, who), timeout)
    except TimeoutError as err:
        with contextlib.suppress(EngineError):
            await _execute(client, who, "migrate_cancel")
        raise EmberTimeoutError(f"{who}: saving the VM state took more than {timeout} s") from err
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def _save(client: QMPClient, dest: Path, who: str) -> tuple[dict[str, Any], str]:
    version = await _execute(client, who, "query-version")
    await _execute(client, who, "stop")
    await _capabilities(client, who)
    await _execute(client, who, "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        await _pass_fd(client, who, fd, "ember-save")
    finally:
        os.close(fd)  # QEMU holds its own copy
    await _execute(client, who, "migrate", {"uri": "fd:ember-save"})
    while True:
        info = await _execute(client, who, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return info, _version_text(version)
        if status in ("failed", "cancelled"):
            raise EngineError(f"{who}: saving the VM state failed: "
                              f"{info.get('error-desc', status)}")
        await asyncio.sleep(POLL_S)


async def load_state(socket_path: Path, src: Path, *, who: str, timeout: float,
                     alive: Any) -> None:
    """Load ``src`` into a QEMU waiting with ``-incoming defer`` and resume the guest.

    ``alive()`` tells whether the QEMU process still runs (it exits when it rejects the
    stream).
    """
    client = await _session(socket_path, who, timeout)
    try:
        await asyncio.wait_for(_load(client, src, who, alive), timeout)
    except TimeoutError as err:
        raise EmberTimeoutError(f"{who}: loading the VM state took more than {timeout} s") from err
    finally:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


async def _load(client: QMPClient, src: Path, who: str, alive: Any) -> None:
    await _capabilities(client, who)
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await _pass_fd(client, who, fd, "ember-load")
    finally:
        os.close(fd)
    await _execute(client, who, "migrate-incoming", {"uri": "fd:ember-load"})
    rejected = EngineError(
        f"{who}: QEMU rejected the saved state {src} (corrupt or truncated, or saved by "
        "another QEMU build, kernel or machine configuration)")
    while True:
        try:
            reply: Any = await client.execute("query-status")
            status = str(reply["status"])
        except (QMPError, OSError, EOFError) as err:
            raise rejected from err
        if status != "inmigrate":
            break
        if not alive():
            raise rejected
        await asyncio.sleep(POLL_S)
    info = await _execute(client, who, "query-migrate")
    if info.get("status") not in (None, "completed"):
        raise EngineError(f"{who}: loading the VM state ended as {info.get('status')}: "
                          f"{info.get('error-desc', '')}".rstrip(": "))
    if status not in ("paused", "running", "prelaunch"):
        raise rejected
    if status != "running":
        await _execute(client, who, "cont")


def _version_text(version: Any) -> str:
    try:
        q = version["qemu"]
        package = str(version.get("package", "")).strip().strip("()")
        return " ".join(f"{q['major']}.{q['minor']}.{q['micro']} {package}".split())
    except (KeyError, TypeError):
        return str(version)[:200]

