"""The tiers a bench run compares, behind one small interface.

``microvm``, ``microvm-cold``, ``container`` and ``gvisor`` are ember sandboxes
(``Sandbox.create``: the default, restored from the template snapshot that ``prepare``
makes; ``boot="cold"``; ``isolation=`` for the last two); ``traditional-vm`` is
:mod:`ember.bench.tradvm`. A tier
that cannot run here raises an :class:`~ember.errors.EmberError` from :meth:`Tier.prepare`
or its first :meth:`Tier.start`; the runner reports it as unavailable with that reason.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Protocol

from ember.bench.syscalls import process_tree
from ember.bench.tradvm import TradKernel, TradVM
from ember.errors import EmberError, TierUnavailableError


class Instance(Protocol):
    def run(self, argv: list[str]) -> None:
        """Run ``argv`` in the instance to completion (raise if it fails)."""

    def host_pids(self) -> list[int]:
        """The host processes that make up this instance (VMM or runtime and descendants)."""

    def close(self) -> None:
        """Destroy the instance; idempotent."""


class Tier(Protocol):
    name: str
    description: str

    def prepare(self) -> None:
        """Check and fetch what the tier needs; raise EmberError if it cannot run here."""

    def start(self) -> Instance:
        """Start one instance and return once it accepts an exec."""


def sdk_supports_isolation() -> bool:
    from ember import Sandbox

    return "isolation" in inspect.signature(Sandbox.create).parameters


class EmberInstance:
    def __init__(self, sb: Any) -> None:
        self._sb = sb
        self._closed = False

    def run(self, argv: list[str]) -> None:
        res = self._sb.exec(argv)
        if res.exit_code != 0:
            raise EmberError(f"{argv} exited {res.exit_code}: {res.stderr[-200:]}")

    def host_pids(self) -> list[int]:
        from ember.sdk.async_sandbox import manager

        rec = manager().store.get_sandbox(self._sb.id)
        return process_tree(rec.pid) if rec.pid else []

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sb.kill()


class EmberTier:
    """A tier served by ``ember.Sandbox``: ``isolation=None`` is the default (microVM)."""

    def __init__(self, name: str, isolation: str | None, *, template: str, memory_mib: int,
                 description: str, boot: str | None = None) -> None:
        self.name = name
        self.isolation = isolation
        self.template = template
        self.memory_mib = memory_mib
        self.description = description
        self.boot = boot

    def prepare(self) -> None:
        if self.isolation is not None and not sdk_supports_isolation():
            raise TierUnavailableError(
                f"this ember's Sandbox.create() has no isolation= keyword yet "
                f"(the {self.isolation!r} tier is not implemented)")
        if self.isolation is None and self.boot is None:
            # The first create of a template and size makes its template snapshot: do it
            # here, so that the figures are those of every later create.
            self.start().close()

    def start(self) -> Instance:
        from ember import Sandbox

        kwargs: dict[str, Any] = {}
        if self.isolation is not None:
            kwargs["isolation"] = self.isolation
        if self.boot is not None:
            kwargs["boot"] = self.boot
        sb = Sandbox.create(self.template, memory_mib=self.memory_mib, timeout=1800, **kwargs)
        inst = EmberInstance(sb)
        try:
            inst.run(["true"])
        except BaseException:
            inst.close()
            raise
        return inst


class TradVMInstance:
    def __init__(self, vm: TradVM) -> None:
        self._vm = vm

    def run(self, argv: list[str]) -> None:
        self._vm.run(argv)

    def host_pids(self) -> list[int]:
        return process_tree(self._vm.pid) if self._vm.pid else []

    def close(self) -> None:
        self._vm.close()


class TradVMTier:
    name = "traditional-vm"

    def __init__(self, *, cache: Path, runs: Path, template: str, memory_mib: int,
                 accel: str, boot_timeout: float = 180.0) -> None:
        self.kernel = TradKernel(cache)
        self.runs = runs
        self.template = template
        self.memory_mib = memory_mib
        self.accel = accel
        self.boot_timeout = boot_timeout
        self.image: Path | None = None
        self.description = "QEMU q35 + SeaBIOS, Debian cloud kernel"

    def prepare(self) -> None:
        from ember.sdk.async_sandbox import manager

        version = self.kernel.ensure()
        self.image = Path(manager().store.get_template(self.template).image_path)
        self.description = (f"QEMU q35 + SeaBIOS, Debian cloud kernel {version} + initramfs, "
                            "virtio-pci; not jailed, no seccomp")

    def start(self) -> Instance:
        if self.image is None:
            raise EmberError("traditional VM tier used before prepare()")
        return TradVMInstance(TradVM(self.kernel, self.image, self.runs,
                                     memory_mib=self.memory_mib, accel=self.accel,
                                     boot_timeout=self.boot_timeout))


def default_tiers(*, template: str, memory_mib: int, cache: Path, home: Path,
                  accel: str) -> list[Tier]:
    """The four tiers in report order. Traditional VMs keep their disks and sockets under
    ``home/bench`` (one directory per VM, removed when it is destroyed)."""
    return [
        EmberTier("container", "container", template=template, memory_mib=memory_mib,
                  description="ember isolation='container' (namespaces, cgroups, seccomp)"),
        EmberTier("gvisor", "gvisor", template=template, memory_mib=memory_mib,
                  description="ember isolation='gvisor' (runsc)"),
        EmberTier("microvm", None, template=template, memory_mib=memory_mib,
                  description=f"ember default: QEMU microvm, ember's kernel, jailed ({accel}), "
                              "restored from the template snapshot"),
        EmberTier("microvm-cold", None, template=template, memory_mib=memory_mib, boot="cold",
                  description=f"ember microvm booted cold (boot='cold'): QEMU microvm, "
                              f"ember's kernel, jailed ({accel})"),
        TradVMTier(cache=cache, runs=home / "bench", template=template,
                   memory_mib=memory_mib, accel=accel),
    ]
