"""The cluster's API keys and tenants' limits as one node's daemon sees them
(:mod:`ember.cluster.keys`; docs/cluster.md): read in a child process (``python -m
ember.cluster.keys``, killed past :data:`READ_TIMEOUT_S`), a reading trusted
:data:`TTL_S` (and served :data:`GRACE_S` longer while the next is read in the
background), an unknown key id making it be read again at most every
:data:`MISS_REFRESH_S`; while the cluster cannot be read, the last good reading serves
(and a failed reading is not tried again for :data:`TTL_S`). Outside a cluster it answers
nothing and costs a read of ``cluster.json``. Keys are looked up synchronously, from the
threads that authenticate a request; limits never wait (the quota check runs on the event
loop): a stale reading is renewed in the background. No Ray import here.
"""

from __future__ import annotations

import logging
import threading
import time

from ember.cluster import child
from ember.cluster.keys import Registry
from ember.cluster.quota import Limits
from ember.cluster.record import load_record
from ember.errors import EmberError, HostError
from ember.paths import Paths
from ember.store.records import ApiKeyRecord

log = logging.getLogger("ember.daemon")

#: A reading is trusted this long; for this much longer it still serves while a new one is
#: read in the background (a request waits for a reading only when the last is older than
#: both: the first after a quiet while). A key revoked on another node stops working here
#: within their sum plus one reading.
TTL_S = 5.0
GRACE_S = 5.0
MISS_REFRESH_S = 1.0
READ_TIMEOUT_S = 10.0


def read_registry(address: str) -> Registry:
    answer = child.ask("keys", address, what="reading the cluster's API keys",
                       timeout=READ_TIMEOUT_S)
    try:
        return Registry.from_json(answer["registry"])
    except (ValueError, KeyError, TypeError) as err:
        raise HostError(f"reading the cluster's API keys failed: {err}") from err


class ClusterKeys:
    """What :mod:`ember.daemon.auth` asks about keys and limits held by the cluster."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._reg: Registry | None = None
        self._at = -1e9  # when the last reading was tried
        self._lock = threading.Lock()

    def _address(self) -> str | None:
        try:
            rec = load_record(self.paths)
        except HostError:
            return None
        return rec.address if rec is not None else None

    def registry(self, max_age: float = TTL_S) -> Registry | None:
        """A reading at most ``max_age`` old (or the last good one); None outside a
        cluster or when none could ever be read."""
        address = self._address()
        if address is None:
            return None
        age = time.monotonic() - self._at
        if age < max_age:
            return self._reg
        if (stale := self._reg) is not None and max_age >= TTL_S and age < max_age + GRACE_S:
            self._renew()
            return stale  # this one: the renewal may land before the return
        with self._lock:
            if time.monotonic() - self._at < max_age:
                return self._reg
            try:
                self._reg = read_registry(address)
            except EmberError as err:
                log.warning("cluster keys: %s (using the reading of %.0f s ago)", err,
                            time.monotonic() - self._at)
            self._at = time.monotonic()
            return self._reg

    def key(self, key_id: str, *, unknown_here: bool) -> ApiKeyRecord | None:
        """The cluster's record of ``key_id``; a key this node does not know
        (``unknown_here``) and the reading does not either makes it be read again."""
        reg = self.registry()
        if reg is not None and unknown_here and key_id not in reg.keys:  # made just now?
            reg = self.registry(MISS_REFRESH_S)
        return None if reg is None else reg.keys.get(key_id)

    def limits(self, tenant: str) -> Limits | None:
        """The cluster's limits for ``tenant`` from the last reading, never waiting (a quota
        check holds the event loop): a stale reading is renewed in the background."""
        if self._address() is None:
            return None
        reg = self._reg
        if time.monotonic() - self._at >= TTL_S:
            self._renew()
        return None if reg is None else reg.tenants.get(tenant)

    def _renew(self) -> None:
        """Read again in the background (one reading at a time)."""
        if not self._lock.locked():
            threading.Thread(target=self.registry, kwargs={"max_age": MISS_REFRESH_S},
                             name="ember-cluster-keys", daemon=True).start()
