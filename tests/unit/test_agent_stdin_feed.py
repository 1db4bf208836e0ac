"""The bounded STDIN buffer of an exec."""

from __future__ import annotations

import os
import threading

from ember.agent.stdin_feed import StdinFeed


def test_pump_writes_in_order_then_closes() -> None:
    feed = StdinFeed(limit=10)
    read_fd, write_fd = os.pipe()
    pipe = os.fdopen(write_fd, "wb")
    thread = threading.Thread(target=feed.pump, args=(pipe,))
    thread.start()
    for chunk in (b"abc", b"", b"defgh", b"ijklmnop"):
        feed.put(chunk)
    feed.finish()
    feed.put(b"after eof")  # dropped
    thread.join(10)
    with os.fdopen(read_fd, "rb") as reader:
        assert reader.read() == b"abcdefghijklmnop"


def test_full_buffer_stalls_then_drops() -> None:
    feed = StdinFeed(limit=4, stall=0.05)
    feed.put(b"12345")  # fills the buffer; nobody pumps
    feed.put(b"6")  # waits 50 ms, then gives up on this stdin
    feed.put(b"7")  # dropped at once
    read_fd, write_fd = os.pipe()
    feed.pump(os.fdopen(write_fd, "wb"))  # returns at once: abandoned
    with os.fdopen(read_fd, "rb") as reader:
        assert reader.read() == b""


def test_program_that_closed_stdin() -> None:
    feed = StdinFeed()
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    feed.put(b"data")
    feed.pump(os.fdopen(write_fd, "wb"))  # EPIPE: abandoned, no exception
    feed.put(b"more")  # dropped
