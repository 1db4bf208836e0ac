"""The CPU a KVM guest sees, recorded with a snapshot and checked before a restore.

Under KVM the guest runs with ``-cpu host``: it sees the host CPU's vendor, family, model
and every feature KVM can pass through, and its kernel picks code paths (alternatives,
mitigations, xsave layout) from them at boot. A snapshot restored on a host whose CPU
lacks one of those features would crash later (an illegal instruction in the guest, or a
QEMU that cannot load the saved xsave state). So a KVM snapshot records the guest CPU
(QMP ``query-cpu-model-expansion`` of the running model, taken from the VM being saved),
and a restore asks the restoring QEMU the same question before loading any state:

- another vendor, or any feature missing, is refused with the features named;
- extra features on the restoring host are accepted (the guest kernel never enabled them);
- another family or model with every feature present is accepted and logged.

Under TCG the guest CPU is QEMU's emulated model, the same on every host with the same
QEMU build (which the snapshot already pins): nothing is recorded.

Pure: the expansion comes in as decoded JSON (untrusted when read back from a manifest)
and every field is validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ember.errors import SnapshotError

#: The model a KVM guest runs with (``-cpu``); what the expansion is asked about.
KVM_CPU_MODEL = "host"
MAX_FEATURES = 4096
MAX_NAME = 64


@dataclass(frozen=True)
class GuestCpu:
    vendor: str
    family: int
    model: int
    stepping: int
    features: frozenset[str]

    def to_json(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "family": self.family, "model": self.model,
                "stepping": self.stepping, "features": sorted(self.features)}

    @classmethod
    def from_json(cls, doc: object) -> GuestCpu:
        """From a manifest's ``cpu`` entry; SnapshotError when it is malformed."""
        if not isinstance(doc, dict):
            raise SnapshotError("the snapshot's CPU record is not an object")
        vendor, feats = doc.get("vendor"), doc.get("features")
        ints = [doc.get(k) for k in ("family", "model", "stepping")]
        if (not isinstance(vendor, str) or len(vendor) > MAX_NAME
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ints)
                or not isinstance(feats, list) or len(feats) > MAX_FEATURES
                or not all(isinstance(f, str) and 0 < len(f) <= MAX_NAME for f in feats)):
            raise SnapshotError("the snapshot's CPU record is malformed")
        family, model, stepping = (int(i) for i in ints)  # type: ignore[arg-type]
        return cls(vendor, family, model, stepping, frozenset(feats))

    def describe(self) -> str:
        return f"{self.vendor} family {self.family} model {self.model}"


def from_expansion(reply: object) -> GuestCpu:
    """A :class:`GuestCpu` from QMP ``query-cpu-model-expansion`` (type ``full``)."""
    model = reply.get("model") if isinstance(reply, dict) else None
    props = model.get("props") if isinstance(model, dict) else None
    if not isinstance(props, dict):
        raise SnapshotError("QEMU's CPU model expansion has no properties")
    vendor = props.get("vendor")
    nums = [props.get(k) for k in ("family", "model", "stepping")]
    if not isinstance(vendor, str) or not all(isinstance(n, int) for n in nums):
        raise SnapshotError("QEMU's CPU model expansion lacks vendor, family or model")
    # Every true boolean property: CPUID feature bits (under each of QEMU's alias
    # spellings) and QEMU's own CPU switches, which the pinned QEMU build and argv keep
    # equal on both sides.
    feats = frozenset(k for k, v in props.items() if v is True and len(k) <= MAX_NAME)
    family, mdl, stepping = (int(n) for n in nums)  # type: ignore[arg-type]
    return GuestCpu(vendor, family, mdl, stepping, feats)


def restore_problem(saved: GuestCpu, here: GuestCpu) -> str | None:
    """Why a guest saved on ``saved`` cannot run on ``here``, or None when it can."""
    if saved.vendor != here.vendor:
        return (f"it was taken on a {saved.vendor} CPU and this host's guests get a "
                f"{here.vendor} CPU")
    missing = sorted(saved.features - here.features)
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more"
                                           if len(missing) > 12 else "")
        return (f"this host's guest CPU ({here.describe()}) lacks features the snapshot's "
                f"guest ({saved.describe()}) was using: {shown}")
    return None
