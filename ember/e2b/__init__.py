"""E2B's API, spoken by the daemon, so that the official ``e2b`` SDKs drive ember
(docs/e2b.md): the lifecycle REST API (:mod:`.routes_lifecycle`) on the daemon's own
routes, and envd, the in-sandbox API (:mod:`.envd`), answered by the daemon for the guest.
Both translate into the runtime calls the rest of the daemon makes.
"""

from __future__ import annotations

from fastapi import FastAPI

from ember.daemon.live import LiveSandboxes
from ember.e2b.envd import Envd, EnvdRouting
from ember.e2b.ports import E2bPortRouting, E2bPorts
from ember.e2b.routes_lifecycle import router
from ember.e2b.state import E2bState, load_secret
from ember.paths import Paths

SECRET_FILE = "e2b.key"


def install(app: FastAPI, paths: Paths, live: LiveSandboxes, domain: str) -> None:
    """Serve E2B's API from ``app``: its routes, and envd's requests (told apart by their
    ``E2b-Sandbox-Id`` header) diverted before any other layer."""
    state = E2bState(load_secret(paths.home / SECRET_FILE), domain)
    app.state.e2b = state
    app.include_router(router)
    app.state.e2b_ports = ports = E2bPorts(live, state)
    app.add_middleware(E2bPortRouting, ports=ports, domain=domain)
    app.add_middleware(EnvdRouting, envd=Envd(live, state), domain=domain)
    from ember.daemon.cluster_e2b import E2bClusterForward

    # On a cluster: what is for another node's sandbox goes there, before anything here.
    app.add_middleware(E2bClusterForward, paths=paths, domain=domain)


__all__ = ["install"]
