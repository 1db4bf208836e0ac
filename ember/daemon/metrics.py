"""Prometheus metrics of one daemon (prometheus_client, one registry per app)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.errors import EmberError
from ember.runtime.manager import SandboxManager
from ember.runtime.states import LIVE_STATES
from ember.store.records import TENANT_KEY

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Sandboxes(Collector):
    """Sandboxes by state and tier, and warm pools, read from the registry at scrape
    time."""

    def __init__(self, mgr: SandboxManager) -> None:
        self._mgr = mgr

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("ember_sandboxes",
                              "Sandboxes of this home by state, tier and tenant",
                              labels=["state", "isolation", "tenant"])
        counts = Tally((r.state, r.isolation, r.metadata.get(TENANT_KEY, ""))
                       for r in self._mgr.store.list_sandboxes())
        for (state, iso, tenant), n in sorted(counts.items()):
            g.add_metric([state, iso, tenant], n)
        yield g
        yield from self._pools()

    def _pools(self) -> Iterator[GaugeMetricFamily]:
        """Warm pools: members asked for, ready and starting (from the registry)."""
        sizes = GaugeMetricFamily("ember_pool_size", "Warm pool members asked for", labels=["pool"])
        members = GaugeMetricFamily("ember_pool_members", "Warm pool members by state",
                                    labels=["pool", "state"])
        rows = self._mgr.store.list_sandboxes()
        for pool in self._mgr.store.list_pools():
            sizes.add_metric([pool.key], pool.size)
            mine = [r for r in rows if r.pool == pool.key and r.state in LIVE_STATES]
            ready = sum(1 for r in mine if r.state == "pooled")
            members.add_metric([pool.key, "ready"], ready)
            members.add_metric([pool.key, "starting"], len(mine) - ready)
        yield sizes
        yield members


class _Networks(Collector):
    """Each networked sandbox's traffic and refusals, read from the kernel at scrape time
    (one netlink dump and one nftables listing)."""

    def __init__(self, mgr: SandboxManager) -> None:
        self._mgr = mgr

    def collect(self) -> Iterator[CounterMetricFamily]:
        traffic = CounterMetricFamily("ember_sandbox_network_bytes",
                                      "Bytes a sandbox's network carried, by direction "
                                      "(out: from the guest)", labels=["sandbox", "direction"])
        refused = CounterMetricFamily("ember_sandbox_network_refused_packets",
                                      "Packets a sandbox's policy refused (or dropped as "
                                      "spoofed)", labels=["sandbox", "why"])
        try:
            stats = self._mgr.network.stats()
        except (EmberError, OSError):
            stats = {}
        for sid, s in sorted(stats.items()):
            traffic.add_metric([sid, "out"], s.bytes_out)
            traffic.add_metric([sid, "in"], s.bytes_in)
            refused.add_metric([sid, "policy"], s.refused_packets)
            refused.add_metric([sid, "spoofed"], s.dropped_packets)
        yield traffic
        yield refused


class Metrics:
    def __init__(self, mgr: SandboxManager) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Sandboxes(mgr))
        self.registry.register(_Networks(mgr))
        self.latency = Histogram("ember_operation_seconds",
                                 "Latency of sandbox operations served by the daemon",
                                 ["op"], buckets=_LATENCY, registry=self.registry)
        self.errors = Counter("ember_errors", "Errors answered, by stable code", ["code"],
                              registry=self.registry)
