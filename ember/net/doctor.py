"""``ember doctor``'s rows for sandbox networking: each piece, and the fix when missing."""

from __future__ import annotations

import os
import shutil

from ember.engine.doctor import Check
from ember.net.manager import host_ns_name
from ember.net.nsutil import netns_path


def checks() -> list[Check]:
    out = []
    root = os.geteuid() == 0
    out.append(Check("network: root", root,
                     "networked sandboxes need ember (its daemon) running as root" if not root
                     else "root: ember makes namespaces, links and nftables rules",
                     None if root else "run ember (or emberd) as root"))
    tun = os.path.exists("/dev/net/tun")
    out.append(Check("network: tun", tun, "/dev/net/tun" + ("" if tun else " is missing"),
                     None if tun else "modprobe tun (CONFIG_TUN)"))
    nft = shutil.which("nft")
    out.append(Check("network: nftables", nft is not None,
                     nft or "the nft program is missing", None if nft else
                     "apt-get install nftables"))
    dnsmasq = shutil.which("dnsmasq")
    out.append(Check("network: dnsmasq", dnsmasq is not None,
                     (dnsmasq or "the dnsmasq program is missing") + " (each sandbox's resolver)",
                     None if dnsmasq else "apt-get install dnsmasq-base"))
    setpriv = shutil.which("setpriv")
    try:
        import dns.asyncresolver  # noqa: F401
        resolver = True
    except ImportError:
        resolver = False
    proxy_ok = setpriv is not None and resolver
    out.append(Check("network: web proxy", proxy_ok,
                     "setpriv and dnspython (each sandbox's proxy for domain rules)" if proxy_ok
                     else "setpriv is missing" if setpriv is None else "dnspython is missing",
                     None if proxy_ok else "apt-get install util-linux" if setpriv is None
                     else "pip install dnspython (scripts/install.sh does)"))
    name = host_ns_name()
    ok = name is None or netns_path(name).exists()
    out.append(Check("network: host namespace", ok,
                     "the host's own" if name is None else f"EMBER_NET_HOST_NS={name}"
                     + ("" if ok else " does not exist"),
                     None if ok else "unset EMBER_NET_HOST_NS or create that namespace"))
    return out
