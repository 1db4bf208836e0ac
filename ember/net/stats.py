"""A sandbox network's counters (read by :meth:`ember.net.manager.NetworkManager.stats`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NetworkStats:
    """A sandbox network's counters since it was set up (``out``: from the guest)."""

    bytes_out: int
    bytes_in: int
    packets_out: int
    packets_in: int
    #: Packets to destinations the policy refuses (and connections over the limit).
    refused_packets: int
    #: Packets dropped silently: spoofed sources, IPv6.
    dropped_packets: int
