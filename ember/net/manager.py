"""The host side of sandbox networking: set up, change and tear down one sandbox's network.

Everything is named after the sandbox id and recorded in a host-wide lease (one file per
link index, naming the sandbox and its home), so that teardown is idempotent and a sweep
can remove what a killed creator left: a namespace, a veth, a chain, a lease.

``EMBER_NET_HOST_NS`` names a network namespace (``/run/netns/NAME``) that plays the
host's part instead of the real one: the tests' fake host, whose only uplink is a fake
internet namespace.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import proc
from ember.errors import EmberError, NetworkError
from ember.locks import FileLock
from ember.net import links, ruleset
from ember.net.addressing import MAX_LINKS, Link, netns_name
from ember.net.nsutil import in_netns, netns_path, remove_netns
from ember.net.policy import NetworkPolicy

log = logging.getLogger("ember.net")
LEASES_ROOT = Path("/run/ember/net")
NFT_TIMEOUT_S = 30.0


def host_ns_name(explicit: str | None = None) -> str | None:
    """The namespace playing the host's part: ``explicit``, else ``EMBER_NET_HOST_NS``,
    else None (the host's own)."""
    return explicit if explicit is not None else os.environ.get("EMBER_NET_HOST_NS") or None


@dataclass(frozen=True)
class Attached:
    link: Link
    tap_fd: int


class NetworkManager:
    """Sandbox networks of one ember home, against one host namespace."""

    def __init__(self, home: Path, host_ns: str | None = None) -> None:
        self.home = str(home)
        name = host_ns_name(host_ns)
        self.host_ns = netns_path(name) if name else None
        self.leases = LEASES_ROOT / (name or "host")

    # --- leases ------------------------------------------------------------------------
    def _locked(self) -> FileLock:
        self.leases.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = FileLock(self.leases / ".lock")
        lock.acquire(30.0, "the network lease table")
        return lock

    def _read_lease(self, index: int) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.leases / str(index)).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _lease(self, sandbox_id: str) -> Link:
        lock = self._locked()
        try:
            used = {int(p.name) for p in self.leases.iterdir() if p.name.isdigit()}
            index = next((i for i in range(MAX_LINKS) if i not in used), None)
            if index is None:
                raise NetworkError(f"all {MAX_LINKS} sandbox links of this host are in use")
            (self.leases / str(index)).write_text(
                json.dumps({"sandbox": sandbox_id, "home": self.home}))
            return Link(index, sandbox_id)
        finally:
            lock.release()

    def find(self, sandbox_id: str) -> Link | None:
        """The link leased to ``sandbox_id`` in this home, if any."""
        if not self.leases.is_dir():
            return None
        for p in self.leases.iterdir():
            if p.name.isdigit():
                doc = self._read_lease(int(p.name))
                if doc and doc.get("sandbox") == sandbox_id and doc.get("home") == self.home:
                    return Link(int(p.name), sandbox_id)
        return None

    # --- nftables ----------------------------------------------------------------------
    def _nft(self, cmds: list[ruleset.Cmd], what: str) -> None:
        doc = json.dumps({"nftables": cmds}).encode()
        proc.run(["nft", "-j", "-f", "-"], input=doc, what=what, timeout=NFT_TIMEOUT_S)

    def _host_table(self) -> dict[str, set[str]]:
        """What the host table holds now: ``chains`` and ``elements`` (interface names)."""
        got = proc.run(["nft", "-j", "list", "table", ruleset.FAMILY, ruleset.TABLE],
                       what="list the ember nftables table", check=False,
                       timeout=NFT_TIMEOUT_S)
        chains: set[str] = set()
        elements: set[str] = set()
        if got.returncode != 0:
            return {"chains": chains, "elements": elements, "missing": {"table"}}
        for item in json.loads(got.stdout or "{}").get("nftables", []):
            if "chain" in item:
                chains.add(item["chain"]["name"])
            if "map" in item and item["map"]["name"] == ruleset.EGRESS_MAP:
                for elem in item["map"].get("elem", []):
                    if isinstance(elem, list) and elem and isinstance(elem[0], str):
                        elements.add(elem[0])
        return {"chains": chains, "elements": elements, "missing": set()}

    def _ensure_base(self) -> None:
        if "table" in self._host_table()["missing"]:
            try:
                self._nft(ruleset.base_table(), "create the ember nftables table")
            except EmberError:
                if "table" in self._host_table()["missing"]:  # not made by a racing home
                    raise

    # --- lifecycle ---------------------------------------------------------------------
    def attach(self, sandbox_id: str, policy: NetworkPolicy) -> Attached:
        """Make the sandbox's namespace, links, NAT and policy; return the tap descriptor
        for its VMM (the caller closes it once the VMM holds it). On failure nothing is
        left behind."""
        proc.require("nft")
        link = self._lease(sandbox_id)
        ns = netns_path(netns_name(sandbox_id))
        try:
            in_netns(ns, lambda: None, create=True)

            def host_side() -> None:
                links.make_veth(link, ns)
                self._ensure_base()
                self._nft(ruleset.add_sandbox(link, policy),
                          f"add sandbox {sandbox_id}'s network policy")

            in_netns(self.host_ns, host_side)

            def sandbox_side() -> int:
                fd = links.setup_sandbox_side(link)
                try:
                    self._nft(ruleset.sandbox_table(), f"NAT sandbox {sandbox_id}")
                except BaseException:
                    os.close(fd)
                    raise
                return fd

            fd = in_netns(ns, sandbox_side)
        except BaseException as err:
            self.detach(sandbox_id, link)
            if isinstance(err, EmberError | KeyboardInterrupt):
                raise
            raise NetworkError(f"cannot set up sandbox {sandbox_id}'s network: {err}") from err
        log.info("sandbox %s: network on link %s (%s)", sandbox_id, link.index, link.host_if)
        return Attached(link, fd)

    def update(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Replace the sandbox's policy in one nftables transaction."""
        link = self.find(sandbox_id)
        if link is None:
            raise NetworkError(f"sandbox {sandbox_id} has no network set up on this host")
        in_netns(self.host_ns, lambda: self._nft(
            ruleset.update_sandbox(link, policy), f"change sandbox {sandbox_id}'s policy"))

    def detach(self, sandbox_id: str, link: Link | None = None) -> bool:
        """Remove everything of the sandbox's network; True if anything was there.
        Idempotent; safe on a half-made network."""
        link = link or self.find(sandbox_id)
        found = False
        ns = netns_path(netns_name(sandbox_id))
        if link is not None:
            def host_side() -> bool:
                table = self._host_table()
                cmds = ruleset.remove_sandbox(
                    link, has_element=link.host_if in table["elements"],
                    has_chain=ruleset.sandbox_chain_name(link) in table["chains"])
                if cmds:
                    self._nft(cmds, f"remove sandbox {sandbox_id}'s network policy")
                return links.remove_host_link(link) or bool(cmds)

            found = in_netns(self.host_ns, host_side)
        found = remove_netns(ns) or found
        if link is not None:
            (self.leases / str(link.index)).unlink(missing_ok=True)
            found = True
        return found

    def sweep(self, alive: set[str]) -> list[str]:
        """Remove the networks of this home's sandboxes that are not in ``alive``; the ids
        removed."""
        removed: list[str] = []
        if self.leases.is_dir():
            for p in sorted(self.leases.iterdir()):
                doc = self._read_lease(int(p.name)) if p.name.isdigit() else None
                if doc and doc.get("home") == self.home and doc.get("sandbox") not in alive:
                    sid = str(doc["sandbox"])
                    with contextlib.suppress(EmberError):
                        self.detach(sid, Link(int(p.name), sid))
                        removed.append(sid)
        return removed
