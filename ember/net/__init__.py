"""Sandbox networking: a per-sandbox network namespace, a veth to the host, NAT, and an
egress policy enforced by nftables in the host's namespace (docs/networking.md)."""
