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
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember import proc
from ember.errors import EmberError, NetworkError
from ember.locks import FileLock
from ember.net import links, resolver, ruleset
from ember.net.addressing import (
    GATEWAY_IP,
    HOST_IF_PREFIX,
    MAX_LINKS,
    PROXY_PORT,
    UPLINK,
    Link,
    guest_netns_name,
    netns_name,
)
from ember.net.nsutil import in_netns, netns_path, remove_netns
from ember.net.policy import NetworkPolicy
from ember.net.stats import NetworkStats

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
    tap_fd: int | None  # a microVM's tap device (None for a container)
    #: A container's own namespace (None for a microVM), for its runtime to join.
    guest_ns: Path | None = None


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
                json.dumps({"sandbox": sandbox_id, "home": self.home, "table": True}))
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
        # stdin by its /proc name: nft reads "-" as /dev/stdin, which a minimal /dev lacks
        proc.run(["nft", "-j", "-f", "/proc/self/fd/0"], input=doc, what=what,
                 timeout=NFT_TIMEOUT_S)

    def _host_table(self) -> dict[str, set[str]]:
        """What the host table holds now: ``chains``, ``sets``, ``egress`` and ``ingress``
        (links in those maps), ``resolvers`` (links in the resolver set); ``missing`` has
        "table" when there is none."""
        got = proc.run(["nft", "-j", "list", "table", ruleset.FAMILY, ruleset.TABLE],
                       what="list the ember nftables table", check=False,
                       timeout=NFT_TIMEOUT_S)
        found: dict[str, set[str]] = {"chains": set(), "sets": set(), "egress": set(),
                                      "ingress": set(), "resolvers": set(), "missing": set()}
        if got.returncode != 0:
            found["missing"].add("table")
            return found
        for item in json.loads(got.stdout or "{}").get("nftables", []):
            if "chain" in item:
                found["chains"].add(item["chain"]["name"])
            for kind in ("set", "map"):
                if kind in item:
                    found["sets"].add(item[kind]["name"])
            if "map" in item and item["map"]["name"] in (ruleset.EGRESS_MAP,
                                                        ruleset.INGRESS_MAP):
                for elem in item["map"].get("elem", []):
                    if isinstance(elem, list) and elem and isinstance(elem[0], str):
                        found[item["map"]["name"]].add(elem[0])
            if "set" in item and item["set"]["name"] == ruleset.RESOLVERS_SET:
                for elem in item["set"].get("elem", []):
                    parts = elem.get("concat", []) if isinstance(elem, dict) else []
                    if parts and isinstance(parts[0], str):
                        found["resolvers"].add(parts[0])
        return found

    def _ensure_base(self) -> None:
        """The host table in this layout (made, or its base chains rebuilt, atomically)."""
        if ruleset.LAYOUT_SET not in self._host_table()["sets"]:
            try:
                self._nft(ruleset.base_table(), "create the ember nftables table")
            except EmberError:
                if ruleset.LAYOUT_SET not in self._host_table()["sets"]:  # not a racing home
                    raise

    # --- resolver ----------------------------------------------------------------------
    def _resolver_files(self, link: Link) -> Path:
        return self.leases / f"{link.index}-{link.sandbox_id}.dnsmasq.pid"

    def _start_resolver(self, link: Link, policy: NetworkPolicy) -> None:
        """The sandbox's dnsmasq, in the host namespace (the calling thread's); returns
        once it listens (dnsmasq's parent exits when its child is ready)."""
        proc.require("dnsmasq")
        conf = resolver.resolv_conf_path(self.host_ns.name if self.host_ns else None)
        try:
            servers = resolver.upstreams(conf.read_text(errors="replace"))
        except OSError:
            servers = []
        if not servers:
            log.warning("sandbox %s: no IPv4 nameserver in %s: its resolver answers nothing "
                        "it has to forward", link.sandbox_id, conf)
        argv = resolver.dnsmasq_argv(
            link, policy, servers, pidfile=self._resolver_files(link),
            nft_set=(ruleset.FAMILY, ruleset.TABLE, ruleset.domain_set_name(link)))
        proc.run(argv, what=f"start sandbox {link.sandbox_id}'s resolver", timeout=30)

    def _stop_resolver(self, link: Link) -> bool:
        """Stop the sandbox's dnsmasq; False if none ran."""
        return _stop_by_pidfile(self._resolver_files(link))

    # --- proxy -------------------------------------------------------------------------
    def _proxy_files(self, link: Link) -> tuple[Path, Path]:
        """The proxy's pid file and the policy file it reads."""
        stem = f"{link.index}-{link.sandbox_id}"
        return self.leases / f"{stem}.proxy.pid", self.leases / f"{stem}.policy.json"

    def _write_policy(self, link: Link, policy: NetworkPolicy) -> None:
        path = self._proxy_files(link)[1]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(policy.to_json()))
        tmp.rename(path)  # the running proxy sees the new one whole

    def _start_proxy(self, link: Link, policy: NetworkPolicy) -> None:
        """The sandbox's proxy, in its namespace (the calling thread's), as root without
        any capability; returns once it listens."""
        proc.require("setpriv")
        pidfile, policy_file = self._proxy_files(link)
        self._write_policy(link, policy)
        logs = Path(self.home) / "sandboxes" / link.sandbox_id
        argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--",
                sys.executable, "-m", "ember.net.proxy",
                "--listen", f"{GATEWAY_IP}:{PROXY_PORT}", "--resolver", link.host_ip,
                "--policy", str(policy_file), "--pidfile", str(pidfile),
                "--log", str(logs / "network-proxy.log" if logs.is_dir() else os.devnull)]
        proc.run(argv, what=f"start sandbox {link.sandbox_id}'s network proxy", timeout=30)

    def _stop_proxy(self, link: Link) -> bool:
        """Stop the sandbox's proxy (its policy file removed: a proxy whose pid file was
        never written exits by itself); False if none ran."""
        pidfile, policy_file = self._proxy_files(link)
        policy_file.unlink(missing_ok=True)
        return _stop_by_pidfile(pidfile)

    def _proxy_running(self, link: Link) -> bool:
        pid = _pid_of(self._proxy_files(link)[0])
        return pid is not None and _running(pid)

    # --- lifecycle ---------------------------------------------------------------------
    def attach(self, sandbox_id: str, policy: NetworkPolicy, *, tap: bool = True) -> Attached:
        """Make the sandbox's namespace, links, NAT, policy and proxy; return the tap
        descriptor for its VMM (the caller closes it once the VMM holds it), or with
        ``tap=False`` (a container) the container's own namespace, behind the sandbox's,
        for its runtime to join. On failure nothing is left behind."""
        proc.require("nft")
        link = self._lease(sandbox_id)
        ns = netns_path(netns_name(sandbox_id))
        guest_ns = None if tap else netns_path(guest_netns_name(sandbox_id))
        try:
            in_netns(ns, lambda: None, create=True)
            if guest_ns is not None:
                in_netns(guest_ns, lambda: None, create=True)

            def host_side() -> None:
                links.make_veth(link, ns)
                self._ensure_base()
                self._nft(ruleset.add_sandbox(link, policy),
                          f"add sandbox {sandbox_id}'s network policy")
                if policy.rate_in_mbit is not None:
                    links.set_rate(link.host_if, policy.rate_in_mbit)
                self._start_resolver(link, policy)

            in_netns(self.host_ns, host_side)

            def sandbox_side() -> int | None:
                fd = links.setup_sandbox_side(link, guest_ns=guest_ns)
                try:
                    proxied = policy.has_domains
                    if proxied:
                        self._start_proxy(link, policy)
                    self._nft(ruleset.sandbox_table(link) + ruleset.proxied(proxied),
                              f"NAT sandbox {sandbox_id}")
                    if policy.rate_out_mbit is not None:
                        links.set_rate(UPLINK, policy.rate_out_mbit)
                except BaseException:
                    if fd is not None:
                        os.close(fd)
                    raise
                return fd

            fd = in_netns(ns, sandbox_side)
            if guest_ns is not None:
                in_netns(guest_ns, links.setup_guest_side)
        except BaseException as err:
            try:
                self.detach(sandbox_id, link)
            except (EmberError, OSError) as undo:  # the lease stays: a sweep retries
                log.error("sandbox %s: cannot undo a failed network setup: %s", sandbox_id,
                          undo)
            if isinstance(err, EmberError | KeyboardInterrupt):
                raise
            raise NetworkError(f"cannot set up sandbox {sandbox_id}'s network: {err}") from err
        log.info("sandbox %s: network on link %s (%s)", sandbox_id, link.index, link.host_if)
        return Attached(link, fd, guest_ns)

    @contextlib.contextmanager
    def tap_for(self, sandbox_id: str, policy: NetworkPolicy | None) -> Iterator[int | None]:
        """A microVM's network while its VMM starts: the tap descriptor to hand over
        (None without a policy), closed here once the VMM holds its own copy."""
        net = self.attach(sandbox_id, policy) if policy is not None else None
        try:
            yield None if net is None else net.tap_fd
        finally:
            if net is not None and net.tap_fd is not None:
                os.close(net.tap_fd)

    def update(self, sandbox_id: str, policy: NetworkPolicy) -> None:
        """Replace the sandbox's policy in one nftables transaction."""
        link = self.find(sandbox_id)
        if link is None:
            raise NetworkError(f"sandbox {sandbox_id} has no network set up on this host")
        def host_side() -> None:
            self._nft(ruleset.update_sandbox(link, policy),
                      f"change sandbox {sandbox_id}'s policy")
            links.set_rate(link.host_if, policy.rate_in_mbit)
            self._stop_resolver(link)  # dnsmasq takes its domains at start only
            self._start_resolver(link, policy)

        in_netns(self.host_ns, host_side)
        lease = self._read_lease(link.index) or {}

        def sandbox_side() -> None:
            links.set_rate(UPLINK, policy.rate_out_mbit)
            if not lease.get("table"):
                return  # made by an ember before the proxy: no set of proxied ports
            if policy.has_domains:
                if self._proxy_running(link):
                    self._write_policy(link, policy)  # it re-reads the file
                else:
                    self._start_proxy(link, policy)
                self._nft(ruleset.proxied(True), f"proxy sandbox {sandbox_id}'s web traffic")
            else:
                self._nft(ruleset.proxied(False), f"unproxy sandbox {sandbox_id}'s traffic")
                self._stop_proxy(link)

        in_netns(netns_path(netns_name(sandbox_id)), sandbox_side)

    def detach(self, sandbox_id: str, link: Link | None = None) -> bool:
        """Remove everything of the sandbox's network; True if anything was there.
        Idempotent; safe on a half-made network."""
        link = link or self.find(sandbox_id)
        found = False
        ns = netns_path(netns_name(sandbox_id))
        if link is not None:
            def host_side() -> bool:
                stopped = self._stop_proxy(link)
                stopped = self._stop_resolver(link) or stopped
                cmds = ruleset.remove_sandbox(link, self._host_table())
                if cmds:
                    self._nft(cmds, f"remove sandbox {sandbox_id}'s network policy")
                return links.remove_host_link(link) or bool(cmds) or stopped

            found = in_netns(self.host_ns, host_side)
        found = remove_netns(ns) or found
        found = remove_netns(netns_path(guest_netns_name(sandbox_id))) or found
        if link is not None:
            (self.leases / str(link.index)).unlink(missing_ok=True)
            found = True
        return found

    def stats(self) -> dict[str, NetworkStats]:
        """Counters of every sandbox network of this home, by sandbox id (one netlink dump
        and one nftables listing for all of them)."""
        leased = {}
        if self.leases.is_dir():
            for p in self.leases.iterdir():
                doc = self._read_lease(int(p.name)) if p.name.isdigit() else None
                if doc and doc.get("home") == self.home:
                    leased[str(doc["sandbox"])] = Link(int(p.name), str(doc["sandbox"]))
        if not leased:
            return {}

        def read() -> tuple[dict[str, dict[str, int]], dict[str, Any]]:
            got = proc.run(["nft", "-j", "list", "table", ruleset.FAMILY, ruleset.TABLE],
                           what="list the ember nftables table", check=False,
                           timeout=NFT_TIMEOUT_S)
            return (links.link_counters(HOST_IF_PREFIX),
                    json.loads(got.stdout or "{}") if got.returncode == 0 else {})

        counters, table = in_netns(self.host_ns, read)
        refused: dict[str, int] = {}
        spoofed: dict[str, int] = {}
        for item in table.get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            exprs = rule.get("expr", [])
            packets = sum(e["counter"]["packets"] for e in exprs if "counter" in e)
            chain = str(rule.get("chain", ""))
            if any("reject" in e for e in exprs):
                refused[chain] = refused.get(chain, 0) + packets
            elif any("drop" in e for e in exprs):
                spoofed[chain] = spoofed.get(chain, 0) + packets
        out = {}
        for sid, link in leased.items():
            c = counters.get(link.host_if, {})
            chain = ruleset.sandbox_chain_name(link)
            # the host end's rx is what the sandbox sent; its tx what the sandbox received
            out[sid] = NetworkStats(
                bytes_out=c.get("rx_bytes", 0), bytes_in=c.get("tx_bytes", 0),
                packets_out=c.get("rx_packets", 0), packets_in=c.get("tx_packets", 0),
                refused_packets=refused.get(chain, 0),
                dropped_packets=spoofed.get(chain, 0)
                + spoofed.get(ruleset.ingress_chain_name(link), 0))  # spoofed, DNS flood
        return out

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


def _pid_of(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process's command line names the file (a pid reused
    by another process is not taken for it)."""
    try:
        pid = int(pidfile.read_text().strip() or "0")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes() if pid > 0 else b""
    except (OSError, ValueError):
        return None
    return pid if str(pidfile).encode() in argv else None


def _stop_by_pidfile(pidfile: Path) -> bool:
    """Stop the process named by ``pidfile`` and remove the file; False if none ran."""
    pid = _pid_of(pidfile)
    stopped = _terminate(pid) if pid is not None else False
    pidfile.unlink(missing_ok=True)
    return stopped


def _terminate(pid: int, grace: float = 2.0) -> bool:
    """SIGTERM, then SIGKILL after ``grace`` seconds; True if it was running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.005)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (a daemonized dnsmasq belongs to init, which may be slow to
    reap it, or never, in a container whose init does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
