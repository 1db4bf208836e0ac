"""Watching a directory with inotify(7): ``watch`` answers ``watching`` once its watches are
set, then ``fs_events`` (names relative to the watched directory) until the host sends
``abort`` on its stream, its session ends, or the directory itself goes (a final ``eof``).

Everything is bounded: :data:`MAX_WATCH_OPS` watches at once in the agent, at most
:data:`MAX_DIRS` directories per watch (a recursive watch over a bigger tree watches the
first ones and reports ``overflow``), one read of the inotify fd at a time turned into
messages of bounded size and sent before the next read (a slow host leaves the events in
the kernel's queue, whose overflow is reported as ``overflow`` too).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import struct
import threading

from ember.protocol import MAX_WATCH_BATCH, ErrorKind, Message, get_bool, get_str

from .errors import OpError, os_error
from .libc import inotify_add_watch, inotify_init1, inotify_rm_watch
from .reply import Reply
from .threads import log

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000

WATCH_MASK = (IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_ONLYDIR | IN_EXCL_UNLINK)

MAX_WATCH_OPS = 32
"""Watches running at once in the agent; more are refused with ``bad_request``."""
MAX_DIRS = 4096
"""Directories one (recursive) watch follows at most."""
MAX_SCAN = 100_000
"""Entries one walk of a tree looks at, at most (the set-up of a recursive watch, or a
directory made or moved in): a huge tree costs bounded time, and ``overflow``."""
READ_BYTES = 64 * 1024
"""One read of the inotify fd: at most 4096 events, turned into messages before the next."""
MAX_BATCH_COST = 24 * 1024
"""An ``fs_events`` message is sent once its names could need this many bytes of JSON
(each name counted at its worst, every character escaped): it always fits a MSG frame."""

EVENT = struct.Struct("iIII")
"""struct inotify_event without its name: wd, mask, cookie, len."""

_slots = threading.BoundedSemaphore(MAX_WATCH_OPS)
_pseudo: set[int] = set()
"""The devices of /proc and /sys: a recursive walk does not enter them (thousands of
directories whose changes inotify does not report)."""


def _pseudo_devices() -> set[int]:
    if not _pseudo:
        for path in ("/proc", "/sys"):
            with contextlib.suppress(OSError):
                _pseudo.add(os.stat(path).st_dev)
        _pseudo.add(-1)  # looked once
    return _pseudo


def parse_events(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    """The events of one read(2) of an inotify fd: ``(wd, mask, cookie, name)``, the name
    without its NUL padding. Bytes that do not hold whole events raise ValueError."""
    out: list[tuple[int, int, int, bytes]] = []
    pos, end = 0, len(buf)
    while pos < end:
        if end - pos < EVENT.size:
            raise ValueError(f"a truncated inotify event header at byte {pos}")
        wd, mask, cookie, length = EVENT.unpack_from(buf, pos)
        pos += EVENT.size
        if length > end - pos:
            raise ValueError(f"an inotify event name of {length} bytes runs past the read")
        name = bytes(buf[pos:pos + length]).split(b"\0", 1)[0]
        pos += length
        out.append((wd, mask, cookie, name))
    return out


def event_type(mask: int) -> str | None:
    """What an event on an entry of a watched directory means for E2B (as Go's fsnotify
    names it): a rename's new name is a ``create``, its old one a ``rename``."""
    if mask & (IN_CREATE | IN_MOVED_TO):
        return "create"
    if mask & IN_DELETE:
        return "remove"
    if mask & IN_MOVED_FROM:
        return "rename"
    if mask & IN_MODIFY:
        return "write"
    if mask & IN_ATTRIB:
        return "chmod"
    return None


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


class WatchOp:
    """One ``watch``: opened (root watched) by the dispatching thread, run in its own."""

    def __init__(self, root: str, recursive: bool, reply: Reply, fd: int,
                 finished: Callable[[], None]) -> None:
        self.root = root
        self.recursive = recursive
        self._reply = reply
        self._fd = fd
        self._finished = finished
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False
        self._ended = False  # the watched directory went away
        self._overflow = False
        self._root_wd = -1
        self._dirs: dict[int, str] = {}  # wd -> directory, relative to the root
        self._batch: list[Message] = []
        self._cost = 0

    @classmethod
    def open(cls, msg: Message, reply: Reply, finished: Callable[[], None]) -> WatchOp:
        """Claim a slot and watch the root directory (errors are the op's answer)."""
        path = get_str(msg, "path")
        root = path.rstrip("/") or "/"
        if not _slots.acquire(blocking=False):
            raise OpError(ErrorKind.BAD_REQUEST,
                          f"too many directory watches at once ({MAX_WATCH_OPS})")
        try:
            fd = inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            _slots.release()
            raise os_error(err, "cannot start a watch") from None
        try:
            op = cls(root, get_bool(msg, "recursive", False), reply, fd, finished)
        except OSError as err:
            os.close(fd)
            _slots.release()
            raise os_error(err, "cannot start a watch") from None
        try:
            op._root_wd = inotify_add_watch(fd, root, WATCH_MASK)
        except OSError as err:
            op._close()
            if err.errno == errno.ENOSPC:
                raise OpError(ErrorKind.IO, f"cannot watch {path}: the guest's inotify "
                              "watch limit is reached") from None
            raise os_error(err, f"cannot watch {path}") from None
        op._dirs[op._root_wd] = ""
        return op

    # --- any thread -------------------------------------------------------------------------
    def stop(self) -> None:
        """End the watch (the host gave it up, or its session ended): no more replies."""
        with self._lock:
            self._stopped = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    # --- its thread -------------------------------------------------------------------------
    def run(self) -> None:
        failed: Exception | None = None
        try:
            if self.recursive:
                self._watch_tree(self.root, "", emit=False, watched=True)
            if self._stopped or not self._reply.msg({"op": "watching",
                                                     "watches": len(self._dirs)}):
                return
            self._loop()
        except Exception as exc:  # a bug: the host hears of it instead of waiting
            log(f"watch of {self.root} failed: {exc!r}")
            failed = exc
        finally:
            self._close()
            self._finished()
            if failed is not None and not self._stopped:
                self._reply.error(ErrorKind.INTERNAL, f"the watch failed: {failed!r}")
            elif self._ended and not self._stopped:
                self._reply.msg({"op": "eof"})

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopped:
            if not self._flush():
                return
            if self._ended:
                return
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready or self._stopped:
                return
            try:
                data = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                continue
            try:
                events = parse_events(data)
            except ValueError as exc:  # never from a real kernel
                log(f"watch of {self.root}: {exc}")
                self._overflow = True
                continue
            for wd, mask, _cookie, name in events:
                if self._stopped:
                    return
                self._on_event(wd, mask, name)

    def _on_event(self, wd: int, mask: int, raw: bytes) -> None:
        if mask & IN_Q_OVERFLOW:
            self._overflow = True
            return
        if mask & IN_IGNORED:  # the directory went (or its watch was removed)
            if wd == self._root_wd:
                self._ended = True
            self._dirs.pop(wd, None)
            return
        rel_dir = self._dirs.get(wd)
        if rel_dir is None or not raw:
            return  # a forgotten directory, or the event of a directory itself
        rel = _join(rel_dir, _name(raw))
        kind = event_type(mask)
        if kind is not None:
            self._add(rel, kind)
        if self.recursive and mask & IN_ISDIR:
            if mask & (IN_CREATE | IN_MOVED_TO):
                self._watch_tree(self._abs(rel), rel, emit=True, watched=False)
            elif mask & IN_MOVED_FROM:
                self._forget(rel)

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root != "/" else f"/{rel}"

    def _watch_tree(self, path: str, rel: str, *, emit: bool, watched: bool) -> None:
        """Watch the directories at and below ``path`` (depth first, bounded); ``emit``: a
        directory just made or moved in, whose entries may predate its watch: report each
        as created."""
        stack = [(path, rel, watched)]
        scanned = 0
        pseudo = _pseudo_devices()
        while stack and not self._stopped:
            here, here_rel, is_watched = stack.pop()
            if not is_watched:
                if len(self._dirs) >= MAX_DIRS:
                    self._overflow = True
                    return
                try:
                    wd = inotify_add_watch(self._fd, here, WATCH_MASK)
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        self._overflow = True
                        return
                    continue  # gone already, or not readable: nothing to follow
                self._dirs[wd] = here_rel
            try:
                entries = os.scandir(here)
            except OSError:
                continue
            with entries:
                for entry in entries:
                    if self._stopped:
                        return
                    scanned += 1
                    if scanned > MAX_SCAN:
                        self._overflow = True
                        return
                    child = _join(here_rel, _name(os.fsencode(entry.name)))
                    if emit:
                        self._add(child, "create")
                    try:
                        is_dir = (entry.is_dir(follow_symlinks=False)
                                  and entry.stat(follow_symlinks=False).st_dev not in pseudo)
                    except OSError:
                        is_dir = False
                    if is_dir:
                        stack.append((entry.path, child, False))

    def _forget(self, rel: str) -> None:
        """A directory moved away: stop following it and what is below (moved within the
        watched tree, it is watched again under its new name)."""
        prefix = rel + "/"
        for wd, name in list(self._dirs.items()):
            if wd != self._root_wd and (name == rel or name.startswith(prefix)):
                del self._dirs[wd]
                inotify_rm_watch(self._fd, wd)

    def _add(self, name: str, kind: str) -> None:
        self._batch.append({"name": name, "type": kind})
        self._cost += 6 * len(name) + 32
        if len(self._batch) >= MAX_WATCH_BATCH or self._cost >= MAX_BATCH_COST:
            self._flush()

    def _flush(self) -> bool:
        """Send what is pending; False once the host can no longer hear it."""
        if self._stopped:
            return False
        if not self._batch and not self._overflow:
            return True
        message: Message = {"op": "fs_events", "events": self._batch}
        if self._overflow:
            message["overflow"] = True
        self._batch, self._cost, self._overflow = [], 0, False
        if not self._reply.msg(message):
            self._stopped = True
            return False
        return True

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._fd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        _slots.release()
