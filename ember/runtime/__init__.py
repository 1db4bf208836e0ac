"""Sandbox lifecycle on this host: create, connect, reconcile, destroy."""
