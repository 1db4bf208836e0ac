"""File operations: read (streamed), write (streamed in), list, stat, mkdir, remove, rename."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat

from ember.protocol import (
    MAX_DATA_PAYLOAD,
    ErrorKind,
    Kind,
    Message,
    get_bool,
    get_opt_int,
    get_str,
)

from .chunking import chunked
from .errors import OpError, os_error
from .reply import Reply


def file_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def safe_name(name: str) -> str:
    """A file name as valid Unicode (undecodable bytes become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def entry(name: str, st: os.stat_result) -> Message:
    return {
        "name": safe_name(name),
        "type": file_type(st.st_mode),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }


def stat_path(msg: Message) -> list[Message]:
    """``stat`` follows symlinks (``list`` does not)."""
    path = get_str(msg, "path")
    try:
        st = os.stat(path)
    except OSError as err:
        raise os_error(err, f"cannot stat {path}") from None
    name = os.path.basename(path.rstrip("/")) or "/"
    return [{"op": "stat_result", **entry(name, st)}]


def list_dir(msg: Message) -> list[Message]:
    path = get_str(msg, "path")
    entries: list[Message] = []
    try:
        with os.scandir(path) as found:
            for item in found:
                try:
                    entries.append(entry(item.name, item.stat(follow_symlinks=False)))
                except OSError:
                    continue  # removed while listing
    except OSError as err:
        raise os_error(err, f"cannot list {path}") from None
    entries.sort(key=lambda e: str(e["name"]))
    return chunked("list_result", "entries", entries)


def make_dir(msg: Message) -> list[Message]:
    path = get_str(msg, "path")
    try:
        if get_bool(msg, "parents"):
            os.makedirs(path, 0o755, exist_ok=True)
        else:
            os.mkdir(path, 0o755)
    except OSError as err:
        raise os_error(err, f"cannot create directory {path}") from None
    return [{"op": "ok"}]


def remove_path(msg: Message) -> list[Message]:
    path = get_str(msg, "path")
    if os.path.normpath(path) == "/":
        raise OpError(ErrorKind.BAD_REQUEST, "refusing to remove /")
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            if get_bool(msg, "recursive"):
                import shutil  # only here: it is slow to import on a TCG guest, and rarely needed

                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except OSError as err:
        raise os_error(err, f"cannot remove {path}") from None
    return [{"op": "ok"}]


def rename_path(msg: Message) -> list[Message]:
    src, dst = get_str(msg, "src"), get_str(msg, "dst")
    try:
        os.rename(src, dst)
    except OSError as err:
        raise os_error(err, f"cannot rename {src} to {dst}") from None
    return [{"op": "ok"}]


def stream_read(msg: Message, reply: Reply) -> list[Message]:
    """Send ``file {size, mode}`` and the FILEDATA frames; return the final ``eof``."""
    path = get_str(msg, "path")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as err:
        raise os_error(err, f"cannot read {path}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise OpError(ErrorKind.IS_A_DIRECTORY, f"cannot read {path}: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise OpError(ErrorKind.BAD_REQUEST, f"cannot read {path}: not a regular file")
        os.set_blocking(fd, True)
        if not reply.msg({"op": "file", "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)}):
            return []
        while True:
            try:
                chunk = os.read(fd, MAX_DATA_PAYLOAD)
            except OSError as err:
                raise os_error(err, f"cannot read {path}") from None
            if not chunk:
                return [{"op": "eof"}]
            if not reply.data(Kind.FILEDATA, chunk):
                return []
    finally:
        os.close(fd)


class FileWriter:
    """A ``write`` in progress: FILEDATA frames go to the file until ``eof``.

    A regular file (or a new one) is written to a hidden sibling and renamed over the
    target at ``eof``: a write that ends early (``abort``, the session gone) leaves the old
    file as it was and no partial one. ``append``, and targets that are not regular files
    (devices, FIFOs, /proc), are written in place. ``mode``, when given, is applied even to
    an existing file; otherwise an existing file keeps its mode and owner.
    """

    def __init__(self, fd: int, path: str, staged: str | None = None,
                 target: str | None = None) -> None:
        self.path = path
        self.written = 0
        self._fd: int | None = fd
        self._staged = staged  # the hidden sibling renamed over ``target`` at the end
        self._target = target or path

    @classmethod
    def open(cls, msg: Message) -> FileWriter:
        path = get_str(msg, "path")
        mode = get_opt_int(msg, "mode")
        append = get_bool(msg, "append")
        try:
            old = os.stat(path)
        except OSError:
            old = None
        if append or (old is not None and not stat.S_ISREG(old.st_mode)):
            return cls._in_place(path, mode, append)
        return cls._staged_write(path, mode, old)

    @classmethod
    def _in_place(cls, path: str, mode: int | None, append: bool) -> FileWriter:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        flags |= os.O_APPEND if append else os.O_TRUNC
        try:
            fd = os.open(path, flags, 0o644 if mode is None else mode)
        except OSError as err:
            raise os_error(err, f"cannot write {path}") from None
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            os.set_blocking(fd, True)
        except OSError as err:
            os.close(fd)
            raise os_error(err, f"cannot write {path}") from None
        return cls(fd, path)

    @classmethod
    def _staged_write(cls, path: str, mode: int | None,
                      old: os.stat_result | None) -> FileWriter:
        real = os.path.realpath(path)  # through a symlink: replace what it points to
        if os.path.isdir(real):
            raise os_error(IsADirectoryError(errno.EISDIR, "Is a directory"),
                           f"cannot write {path}")
        parent, name = os.path.split(real)
        staged = os.path.join(parent, f".{name[:200]}.ember-{secrets.token_hex(4)}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        perm = mode if mode is not None else (old.st_mode & 0o7777 if old else 0o644)
        try:
            fd = os.open(staged, flags, 0o600)
        except OSError as err:
            raise os_error(err, f"cannot write {path}") from None
        try:
            if old is not None and mode is None:
                os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, perm)
        except OSError as err:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise os_error(err, f"cannot write {path}") from None
        return cls(fd, path, staged, real)

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise OpError(ErrorKind.INTERNAL, f"write to {self.path} already ended")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            self.abort()
            raise os_error(err, f"cannot write {self.path}") from None
        self.written += len(data)

    def finish(self) -> Message:
        """Close the file (and put it in place); the final ``ok {size}`` (bytes written by
        this request)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
                if self._staged is not None:
                    os.rename(self._staged, self._target)
                    self._staged = None
            except OSError as err:
                self.abort()
                raise os_error(err, f"cannot write {self.path}") from None
        return {"op": "ok", "size": self.written}

    def abort(self) -> None:
        """The write ends early: close, and drop the staged copy (the target is as it
        was)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        staged, self._staged = self._staged, None
        if staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(staged)
