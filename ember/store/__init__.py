"""Embedded state: one SQLite database per ember home (templates, sandboxes)."""

from ember.store.db import Store
from ember.store.records import SandboxRecord, TemplateRecord

__all__ = ["SandboxRecord", "Store", "TemplateRecord"]
