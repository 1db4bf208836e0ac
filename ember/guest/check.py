"""``ember image check``: boot a template once and prove that ember's init ran inside it.

The guest's init (``ember.mode=check``) prints ``EMBER-CHECK kernel=<release>
digest=<digest>`` on the console and powers off. The host compares the digest read from
inside the image with the one in the registry.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ember.agent import INIT_PATH
from ember.engine import AccelDecision, QemuEngine, VMSpec, detect_accel
from ember.errors import EmberTimeoutError, GuestError
from ember.guest.kernel import require_kernel
from ember.host.ids import IdAllocator, chown_for
from ember.host.jail import JailSpec, jail_wanted
from ember.paths import Paths
from ember.store import Store

# The console file is read while QEMU writes it: only a complete line (ended by a newline)
# counts, or a half-written digest would be reported as a mismatch.
CHECK_RE = re.compile(rb"EMBER-CHECK kernel=(\S{1,64}) digest=(\S{1,80})\r?\n")


@dataclass(frozen=True)
class CheckResult:
    template: str
    kernel_release: str
    digest: str
    expected_digest: str
    accel: str
    accel_reason: str
    boot_to_init_s: float  # QEMU start to the init's line on the console
    total_s: float  # QEMU start to QEMU exit

    @property
    def ok(self) -> bool:
        return self.digest == self.expected_digest


def check_image(paths: Paths, store: Store, name: str, *, timeout: float = 180.0,
                accel: AccelDecision | None = None,
                progress: Callable[[str], None] | None = None) -> CheckResult:
    tpl = store.get_template(name)
    kernel = require_kernel(paths)
    decision = accel or detect_accel()
    paths.ensure()
    work = Path(tempfile.mkdtemp(prefix="check-", dir=paths.tmp))
    handle = None
    try:
        console = work / "console.log"
        jail = _jail_for_check(paths, work, console)
        spec = VMSpec(
            name=f"check-{name}", kernel=kernel.bzimage, disk=Path(tpl.image_path),
            disk_format="raw", disk_readonly=True, vcpus=1, memory_mib=256,
            cmdline=f"init={INIT_PATH} ember.mode=check", console_log=console,
            qmp_socket=work / "qmp.sock",
            agent_socket=None, pidfile=work / "qemu.pid", accel=decision, jail=jail,
        )
        if progress:
            progress(f"booting {name} with kernel {kernel.release} ({decision.accel})")
        t0 = time.monotonic()
        handle = QemuEngine().start(spec)
        match = None
        t_init = 0.0
        while match is None:
            data = console.read_bytes() if console.exists() else b""
            match = CHECK_RE.search(data)
            if match:
                t_init = time.monotonic() - t0
                break
            if not handle.is_alive():
                raise GuestError(f"the guest stopped before its init reported; console tail:\n"
                                 f"{data[-2000:].decode('utf-8', 'replace')}")
            if time.monotonic() - t0 > timeout:
                raise EmberTimeoutError(
                    f"the guest's init did not report within {timeout} s; console tail:\n"
                    f"{data[-2000:].decode('utf-8', 'replace')}")
            time.sleep(0.005)
        if not handle.wait_exit(30.0):
            raise GuestError("the guest did not power off after the check")
        total = time.monotonic() - t0
        return CheckResult(
            template=name, kernel_release=match.group(1).decode(),
            digest=match.group(2).decode(), expected_digest=tpl.digest, accel=decision.accel,
            accel_reason=decision.reason, boot_to_init_s=t_init, total_s=total,
        )
    finally:
        if handle is not None:
            handle.kill()
        shutil.rmtree(work, ignore_errors=True)
        IdAllocator().release(work)


def _jail_for_check(paths: Paths, work: Path, console: Path) -> JailSpec | None:
    """The image being checked may come from anywhere: its VM is jailed like a sandbox's
    (own uid, namespaces, root, full seccomp), when ember runs as root."""
    if not jail_wanted()[0]:
        return None
    uid = IdAllocator().allocate(work)
    console.touch(mode=0o600)
    chown_for(console, uid, uid, 0o600)
    chown_for(work, uid, uid, 0o700)  # QEMU makes its QMP socket here
    return JailSpec(uid=uid, gid=uid, hostname="ember-check", root=paths.home / "jail",
                    log=work / "qemu.log",
                    rlimits=(("nofile", 1024, 1024), ("core", 0, 0)))
