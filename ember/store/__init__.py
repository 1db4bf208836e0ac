"""Embedded state: one SQLite database per ember home (templates, sandboxes, snapshots,
pools)."""

from ember.store.db import Store
from ember.store.records import PoolRecord, SandboxRecord, SnapshotRecord, TemplateRecord

__all__ = ["PoolRecord", "SandboxRecord", "SnapshotRecord", "Store", "TemplateRecord"]
