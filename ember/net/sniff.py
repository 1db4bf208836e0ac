"""Which server a guest's TCP connection asks for, read from its first bytes: the server
name of a TLS ClientHello (SNI) or the ``Host`` header of an HTTP/1 request. Pure: bytes
in, a verdict out; the proxy (:mod:`ember.net.proxy`) feeds it what it has read so far.

The bytes are the guest's, so hostile: every length is checked against what is there,
nothing is read past :data:`MAX_HEAD`, and a name is returned only if it is a valid
lower-case host name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import h11

#: The most a connection's first bytes are read to find its name: a ClientHello (even with
#: large post-quantum key shares) or a request head fits; beyond it there is no name.
MAX_HEAD = 16 * 1024
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_METHOD = re.compile(rb"^[A-Z]{1,16}( |$)")
TLS_HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000


@dataclass(frozen=True)
class Sniffed:
    """``protocol``: what the bytes are; ``name``: the server they name (None: none, or an
    address literal, which names no domain)."""

    protocol: Literal["tls", "http", "other"]
    name: str | None = None


OTHER = Sniffed("other")


def host_name(raw: str) -> str | None:
    """``raw`` as a host name (lower case, no trailing dot), or None if it is not one
    (an address literal is not)."""
    name = raw.strip().lower().rstrip(".")
    if not name or len(name) > 253 or not _NAME.match(name):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


def sniff(data: bytes) -> Sniffed | None:
    """What ``data`` (a connection's first bytes) is; None: too few bytes to tell yet."""
    if not data:
        return None
    if data[0] == TLS_HANDSHAKE:
        return _tls(data)
    if _METHOD.match(data[:17]):  # a method, whole or its start
        return _http(data)
    return OTHER


def _tls(data: bytes) -> Sniffed | None:
    """The ClientHello's handshake message, gathered from its records (it may span
    several), then its server_name extension."""
    hello = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None if len(data) < MAX_HEAD else Sniffed("tls")
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5])
        if ctype != TLS_HANDSHAKE or major != 3 or not 0 < length <= 16384 + 2048:
            return Sniffed("tls") if pos else OTHER
        if len(data) < pos + 5 + length:
            return None if len(data) < MAX_HEAD else Sniffed("tls")
        hello += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hello) >= 4:
            if hello[0] != CLIENT_HELLO:
                return Sniffed("tls")
            need = 4 + int.from_bytes(hello[1:4])
            if len(hello) >= need:
                return Sniffed("tls", _server_name(hello[4:need]))
            if need > MAX_HEAD:
                return Sniffed("tls")


def _server_name(body: bytes) -> str | None:
    """The host name in a ClientHello body's server_name extension (RFC 6066), if any."""
    r = _Reader(body)
    r.skip(2 + 32)  # legacy version, random
    r.skip(r.number(1))  # session id
    r.skip(r.number(2))  # cipher suites
    r.skip(r.number(1))  # compression methods
    if r.failed or r.left() == 0:
        return None
    ext = _Reader(r.take(r.number(2)))
    while not ext.failed and ext.left() >= 4:
        kind, data = ext.number(2), ext.take(ext.number(2))
        if kind != EXT_SERVER_NAME or ext.failed:
            continue
        names = _Reader(data)
        entries = _Reader(names.take(names.number(2)))
        while not entries.failed and entries.left() >= 3:
            name_type, name = entries.number(1), entries.take(entries.number(2))
            if name_type == 0 and not entries.failed:
                try:
                    return host_name(name.decode("ascii"))
                except UnicodeDecodeError:
                    return None
        return None
    return None


class _Reader:
    """Bounds-checked reads of a byte string; a read past its end sets ``failed``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.failed = False

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.failed or n > self.left():
            self.failed = True
            return b""
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        raw = self.take(n)
        return int.from_bytes(raw) if len(raw) == n else 0

    def skip(self, n: int) -> None:
        self.take(n)


def _http(data: bytes) -> Sniffed | None:
    """The Host header of an HTTP/1 request head, parsed by h11."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    try:
        conn.receive_data(data[:MAX_HEAD])
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return Sniffed("http")
    if event is h11.NEED_DATA:
        return None if len(data) < MAX_HEAD else Sniffed("http")
    if not isinstance(event, h11.Request):
        return Sniffed("http")
    for key, value in event.headers:
        if key == b"host":
            host = value.decode("ascii", "replace")
            if host.startswith("["):  # an IPv6 literal
                return Sniffed("http")
            return Sniffed("http", host_name(host.rsplit(":", 1)[0]))
    return Sniffed("http")
