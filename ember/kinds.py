"""The closed sets of names the public API takes and returns, as ``Literal`` types.

Type checkers see them in the SDK's signatures and results; at run time every value that
enters from a caller, the CLI or the wire is still checked against these tuples where it
enters (``SandboxSpec``). Standard library only: the client side imports it too.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The isolation tiers (docs/isolation.md).
Isolation = Literal["microvm", "gvisor", "container"]
#: What happens when a sandbox's lifetime ends.
OnTimeout = Literal["destroy", "pause"]
#: How a create starts a microVM: ``auto`` restores the template snapshot of its template
#: and shape (making it on first use), ``cold`` boots the kernel.
Boot = Literal["auto", "cold"]
#: A sandbox's state in the registry (the transitions: ``ember.runtime.states``).
SandboxState = Literal["creating", "booting", "running", "paused", "pooled", "snapshotting",
                       "failed"]

ISOLATIONS: tuple[Isolation, ...] = get_args(Isolation)
BOOTS: tuple[Boot, ...] = get_args(Boot)
ON_TIMEOUT: tuple[OnTimeout, ...] = get_args(OnTimeout)
SANDBOX_STATES: tuple[SandboxState, ...] = get_args(SandboxState)
