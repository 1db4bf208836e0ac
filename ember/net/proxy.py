"""The transparent proxy of a sandbox whose policy names domains: where its domain rules
are enforced on the connections themselves, not only on DNS answers.

It runs in the sandbox's own network namespace (started by :mod:`ember.net.manager`, as
root without any capability). The namespace's table redirects the guest's new TCP
connections to ports 80 and 443 to it; for each it reads the first bytes, the TLS
ClientHello's server name (SNI) or the HTTP request's ``Host`` (:mod:`ember.net.sniff`),
and decides with the sandbox's policy:

* a name the policy does not resolve (denied, or not allowed with the internet off) is
  refused: HTTP gets a 403, TLS an ``access_denied`` alert;
* an allowed name is resolved through the sandbox's own resolver, and the connection goes
  to the name's address (the one the guest asked for if the name has it, else the name's
  first): a guest that pairs an allowed name with another address (a hard-coded IP, domain
  fronting by address) reaches the name's server, never that address; a name resolving
  into a denied range (DNS rebinding) is refused;
* a connection naming nothing (no SNI, no Host, another protocol) goes to the address it
  asked for only if the policy allows that address by itself (an allowed CIDR, or the
  internet on): with domain rules, 80 and 443 need a name.

Its own connections leave through the sandbox's link, so the host's chain for the sandbox
still applies to them. The policy is re-read from its file when that file changes; when
the file is gone (the network torn down) the proxy exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path

import dns.asyncresolver
import dns.exception

from ember.net.policy import NetworkPolicy, domain_matches
from ember.net.sniff import MAX_HEAD, Sniffed, sniff

log = logging.getLogger("ember.net.proxy")
SO_ORIGINAL_DST = 80
FIRST_BYTES_TIMEOUT_S = 10.0
RESOLVE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1024
CHUNK = 64 * 1024
WATCH_S = 1.0
TLS_ACCESS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31])


class Refused(Exception):
    """The policy refuses the connection (the message says why)."""


class PolicyFile:
    """The sandbox's policy, re-read when its file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.policy = NetworkPolicy()

    def current(self) -> NetworkPolicy:
        st = self.path.stat()  # gone: FileNotFoundError, the caller's signal to stop
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self.stamp:
            self.policy = NetworkPolicy.from_json(json.loads(self.path.read_text()))
            self.stamp = stamp
        return self.policy


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the guest sent the connection before it was redirected here."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def allowed_by_domain(policy: NetworkPolicy, name: str) -> bool:
    return any(domain_matches(d, name) for d in policy.allow_domains)


def choose(policy: NetworkPolicy, name: str | None, wanted: str,
           addresses: list[str]) -> str:
    """The address to connect to for a connection naming ``name`` (None: nothing) that
    the guest sent to ``wanted``; ``addresses``: what the name resolved to. Pure: raises
    :class:`Refused`."""
    if name is None:
        if not policy.decide(wanted):
            raise Refused(f"{wanted} names no server, and the policy does not allow the "
                          "address by itself")
        return wanted
    if not policy.resolves(name):
        raise Refused(f"the policy does not allow {name}")
    if not addresses:
        raise Refused(f"{name} has no IPv4 address")
    target = wanted if wanted in addresses else addresses[0]
    if not policy.decide(target, resolved_for_allowed=allowed_by_domain(policy, name)):
        raise Refused(f"{name} resolves to {target}, which the policy denies")
    return target


class Proxy:
    def __init__(self, policy: PolicyFile, resolver: str) -> None:
        self.policy = policy
        self.resolver = resolver
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def resolve(self, name: str) -> list[str]:
        """The name's IPv4 addresses, from the sandbox's own resolver (which, for an
        allowed domain, also lets the host's chain pass them)."""
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = [self.resolver]
        try:
            answer = await r.resolve(name, "A", lifetime=RESOLVE_TIMEOUT_S, search=False)
        except (dns.exception.DNSException, OSError):
            return []
        return [str(a) for a in answer]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self.slots:
            try:
                await self._handle(reader, writer)
            except Exception as err:  # one connection's trouble is not the proxy's
                log.debug("connection failed: %s", err)
            finally:
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wanted, port = original_destination(writer.get_extra_info("socket"))
        head = b""
        seen: Sniffed | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_BYTES_TIMEOUT_S):
                while seen is None and len(head) < MAX_HEAD:
                    chunk = await reader.read(MAX_HEAD - len(head))
                    if not chunk:
                        break
                    head += chunk
                    seen = sniff(head)
        seen = seen or Sniffed("other")
        policy = self.policy.current()
        addresses = await self.resolve(seen.name) if seen.name and policy.resolves(
            seen.name) else []
        try:
            target = choose(policy, seen.name, wanted, addresses)
        except Refused as why:
            log.info("refused %s:%s (%s): %s", wanted, port, seen.protocol, why)
            await _refuse(writer, seen, str(why))
            return
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            up_reader, up_writer = await asyncio.open_connection(target, port)
        try:
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _refuse(writer: asyncio.StreamWriter, seen: Sniffed, why: str) -> None:
    if seen.protocol == "http":
        body = f"ember: blocked by the sandbox's network policy: {why}\n".encode()
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    elif seen.protocol == "tls":
        writer.write(TLS_ACCESS_DENIED)
    with contextlib.suppress(OSError):
        await writer.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(CHUNK):
            dst.write(chunk)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        dst.close()


async def serve(listener: socket.socket, policy: PolicyFile, resolver: str) -> None:
    proxy = Proxy(policy, resolver)
    server = await asyncio.start_server(proxy.handle, sock=listener, limit=CHUNK)
    async with server:
        while True:  # until the network is torn down (its policy file removed)
            await asyncio.sleep(WATCH_S)
            try:
                policy.current()
            except FileNotFoundError:
                return
            except (OSError, ValueError) as err:
                log.warning("cannot read the policy: %s", err)


def main(argv: list[str] | None = None) -> int:
    """Bind, then detach (the parent exits once the child has written its pid file)."""
    p = argparse.ArgumentParser(prog="python -m ember.net.proxy")
    p.add_argument("--listen", required=True, help="ADDRESS:PORT in this namespace")
    p.add_argument("--resolver", required=True, help="the sandbox's resolver address")
    p.add_argument("--policy", required=True, type=Path, help="the policy's JSON file")
    p.add_argument("--pidfile", required=True, type=Path)
    p.add_argument("--log", type=Path, default=Path("/dev/null"))
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    ipaddress.IPv4Address(host)
    policy = PolicyFile(args.policy)
    policy.current()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(512)
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        return 0 if os.read(ready_r, 1) == b"1" else 1
    os.close(ready_r)
    os.setsid()
    tmp = args.pidfile.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    tmp.rename(args.pidfile)
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    os.write(ready_w, b"1")
    os.close(ready_w)
    asyncio.run(serve(listener, policy, args.resolver))
    return 0


if __name__ == "__main__":
    sys.exit(main())
