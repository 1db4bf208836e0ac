"""Each networked sandbox's DNS resolver: a dnsmasq that ember starts for it in the host's
namespace, on the host end of its link, configured from its policy (pure argv building
here; the process is run by :mod:`ember.net.manager`).

It answers what :meth:`NetworkPolicy.resolves` says, forwarding to the host's upstream
servers: denied domains (and their subdomains) do not exist; allowed ones resolve, and the
addresses they resolve to join the sandbox's nftables set, which its chain accepts even
with the internet off; anything else resolves only with the internet on. An answer
pointing into a private range (DNS rebinding) reaches the guest, but the address stays
refused: the chain checks the always-denied ranges before the set. (dnsmasq's own
``--stop-dns-rebind`` is not used: it also treats the TEST-NET ranges as private.)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ember.net.addressing import Link
from ember.net.policy import NetworkPolicy

MAX_UPSTREAMS = 3


def upstreams(resolv_conf: str) -> list[str]:
    """The IPv4 ``nameserver`` entries of a resolv.conf's text (at most three)."""
    out: list[str] = []
    for line in resolv_conf.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                if ipaddress.ip_address(words[1]).version == 4 and words[1] not in out:
                    out.append(words[1])
            except ValueError:
                continue
    return out[:MAX_UPSTREAMS]


def resolv_conf_path(host_ns: str | None) -> Path:
    """Where the host namespace's resolvers are listed: ``/etc/netns/NAME/resolv.conf`` for
    a named namespace that has one (the convention of ``ip netns exec``), else the host's."""
    if host_ns:
        own = Path("/etc/netns") / host_ns / "resolv.conf"
        if own.is_file():
            return own
    return Path("/etc/resolv.conf")


def _denied(policy: NetworkPolicy, name: str) -> bool:
    return not NetworkPolicy(internet=True, deny=policy.deny).resolves(name)


def dnsmasq_argv(link: Link, policy: NetworkPolicy, servers: list[str], *, pidfile: Path,
                 nft_set: tuple[str, str, str]) -> list[str]:
    """The command line of the sandbox's resolver. ``nft_set``: (family, table, set) that
    addresses of allowed domains are added to."""
    family, table, name = nft_set
    argv = [
        "dnsmasq", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
        "--bind-interfaces", f"--listen-address={link.host_ip}", "--port=53",
        f"--pid-file={pidfile}", "--user=nobody", "--group=nogroup",
        "--cache-size=1000", "--dns-forward-max=64",
        "--domain-needed", "--bogus-priv", "--log-facility=/dev/null",
    ]
    for d in policy.deny_domains:  # no answer: the name does not exist
        argv.append(f"--address=/{d}/")
    allowed = set(policy.allow_domains)
    for d in policy.allow_domains:
        base = d.removeprefix("*.")
        if _denied(policy, base if d == base else f"x.{base}"):
            continue  # a deny covers it (dnsmasq prefers the longest match: say it here)
        argv += [f"--server=/{d}/{s}" for s in servers]
        if d == base and f"*.{base}" not in allowed and not policy.internet:
            argv.append(f"--address=/*.{base}/")  # exactly this name, not its subdomains
        argv.append(f"--nftset=/{base}/4#{family}#{table}#{name}")
    if policy.internet:
        argv += [f"--server={s}" for s in servers]
    return argv
