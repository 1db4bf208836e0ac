"""The names a guest's first bytes carry: TLS SNI from real ClientHellos (made by Python's
ssl module), HTTP Host, and hostile or partial input."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.net.sniff import MAX_HEAD, Sniffed, host_name, sniff


def client_hello(name: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    out = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def test_tls_server_name_is_read_from_a_real_client_hello() -> None:
    assert sniff(client_hello("Allowed.Test")) == Sniffed("tls", "allowed.test")
    assert sniff(client_hello(None)) == Sniffed("tls", None)


def test_a_client_hello_arriving_in_pieces_waits_for_the_rest() -> None:
    hello = client_hello("a.sub.test")
    for cut in (1, 4, 5, 6, 40, len(hello) - 1):
        assert sniff(hello[:cut]) is None
    assert sniff(hello) == Sniffed("tls", "a.sub.test")


def test_a_client_hello_split_over_two_records_is_gathered() -> None:
    hello = client_hello("split.test")
    body = hello[5:]
    half = len(body) // 2
    two = (b"\x16\x03\x01" + half.to_bytes(2, "big") + body[:half]
           + b"\x16\x03\x01" + (len(body) - half).to_bytes(2, "big") + body[half:])
    assert sniff(two) == Sniffed("tls", "split.test")


def test_http_host_header_names_the_server() -> None:
    assert sniff(b"GET / HTTP/1.1\r\nHost: Allowed.test:8080\r\n\r\n") == \
        Sniffed("http", "allowed.test")
    assert sniff(b"GET / HTTP/1.1\r\nHost: 198.51.100.10\r\n\r\n") == Sniffed("http", None)
    assert sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n") == Sniffed("http", None)
    assert sniff(b"GET / HTTP/1.0\r\n\r\n") == Sniffed("http", None)
    assert sniff(b"GE") is None
    assert sniff(b"GET / HTTP/1.1\r\nHost: a.test\r\n") is None  # head not over yet


def test_other_protocols_and_garbage_name_nothing() -> None:
    assert sniff(b"SSH-2.0-OpenSSH_9.2\r\n") == Sniffed("other")
    assert sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == Sniffed("tls")  # not a hello
    assert sniff(b"\x16\x09\x01\x00\x05hello") == Sniffed("other")
    assert sniff(b"GET / HTTP/1.1\r\nHost: bad name!\r\n\r\n") == Sniffed("http", None)
    assert sniff(b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * MAX_HEAD + b"\r\n\r\n") == \
        Sniffed("http", None)


def test_host_names_are_checked() -> None:
    assert host_name("Example.COM.") == "example.com"
    for bad in ("", "a..b", "-a.b", "a" * 64 + ".b", "a b", "10.0.0.1", "x" * 254):
        assert host_name(bad) is None


@given(st.binary(max_size=600))
def test_any_bytes_give_a_verdict_or_ask_for_more(data: bytes) -> None:
    got = sniff(data)
    assert got is None or got.protocol in ("tls", "http", "other")


@given(st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=4))
def test_a_corrupted_client_hello_never_crashes(at: int, junk: bytes) -> None:
    hello = bytearray(client_hello("allowed.test"))
    at %= len(hello)
    hello[at:at + len(junk)] = junk
    got = sniff(bytes(hello))
    assert got is None or got.name in (None, "allowed.test") or got.protocol == "tls"
