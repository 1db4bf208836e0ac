"""Apply one image layer (a tar, maybe compressed) onto a root filesystem directory.

Entries are applied in order with descriptor-relative calls (see :mod:`.rootdir`), never
with ``tarfile.extractall``. OCI whiteouts: ``.wh.NAME`` deletes NAME from lower layers and
``.wh..wh..opq`` empties a directory of lower-layer content (entries of the same layer
stay). Ownership, mode (setuid included), mtime and a few safe xattrs come from the tar
headers. Device nodes, absolute or ``..`` names, hardlinks out of the root or to files not
yet there, and paths through symlinks that leave the root raise :class:`UnsafeLayerError`.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import IO

from ember.errors import BuildError, ImageSourceError, UnsafeLayerError
from ember.guest.oci.compression import decode_errors
from ember.guest.oci.rootdir import (
    Dir,
    RootDir,
    child_dir,
    list_at,
    lstat_at,
    member_parts,
    remove_at,
)
from ember.guest.oci.tarstream import LayerTar

log = logging.getLogger("ember.guest.oci")

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_XATTR_PREFIX = "SCHILY.xattr."
_XATTRS_KEPT = ("user.", "security.capability")
_COPY_CHUNK = 1 << 20


def apply_layer(tar_path: Path, rootfs: Path, *, name: str | None = None) -> None:
    """Apply the layer tar at ``tar_path`` onto ``rootfs``; ``name`` labels it in errors."""
    apply_layer_diff_id(tar_path, rootfs, name=name)


def apply_layer_diff_id(tar_path: Path, rootfs: Path, *, name: str | None = None) -> str:
    """Like :func:`apply_layer`; returns the layer's diff id (sha256 of the plain tar)."""
    label = name or tar_path.name
    corrupt: tuple[type[BaseException], ...] = (tarfile.TarError, *decode_errors())
    try:
        with RootDir(rootfs) as root, LayerTar(str(tar_path), label) as layer:
            applier = _Applier(root, layer)
            for member in layer.members():
                applier.apply(member)
            applier.finish()
            return layer.finish()
    except corrupt as err:
        raise ImageSourceError(f"corrupt or truncated layer {label}: {err}") from err
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BuildError(
                f"the disk is full: cannot extract layer {label} into {rootfs}: {err}"
            ) from err
        if err.errno is None:  # gzip and bz2 report bad data as a bare OSError
            raise ImageSourceError(f"corrupt or truncated layer {label}: {err}") from err
        raise ImageSourceError(f"cannot extract layer {label} into {rootfs}: {err}") from err


class _Applier:
    def __init__(self, root: RootDir, layer: LayerTar) -> None:
        self.root = root
        self.layer = layer
        #: Real paths this layer created, with their ancestors: whiteouts spare these.
        self.added: set[tuple[str, ...]] = set()
        self.dir_times: list[tuple[tuple[str, ...], int]] = []

    def apply(self, m: tarfile.TarInfo) -> None:
        what = f"layer {self.layer.name}: entry {m.name!r}"
        try:
            self._apply(m, what)
        except OSError as err:
            if err.errno is None or err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ImageSourceError(f"{what}: {err.strerror or err}") from err
        except ValueError as err:  # e.g. a NUL byte in a link target
            raise UnsafeLayerError(f"{what}: {err}") from err
        except OverflowError as err:  # an owner or mtime no file system can hold
            raise ImageSourceError(f"{what}: {err}") from err

    def _apply(self, m: tarfile.TarInfo, what: str) -> None:
        parts = member_parts(m.name, what)
        if not parts:
            return  # the root itself: its owner and mode are the builder's
        base = parts[-1]
        if any(p.startswith(WHITEOUT) for p in parts[:-1]):
            raise ImageSourceError(f"{what}: whiteout name used as a directory")
        if base == OPAQUE:
            self._opaque(parts[:-1], what)
            return
        if base.startswith(WHITEOUT + WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk, ...): nothing to apply
        if base.startswith(WHITEOUT):
            self._whiteout(parts[:-1], base[len(WHITEOUT) :], what)
            return
        if m.ischr() or m.isblk():
            raise UnsafeLayerError(f"device node in layer: {m.name} (layer {self.layer.name})")
        link_parts: tuple[str, ...] = ()
        if m.islnk():
            link_parts = member_parts(m.linkname, f"{what}: hardlink target")
            if not link_parts:
                raise UnsafeLayerError(f"{what}: hardlink to the root directory")
        elif not (m.isreg() or m.isdir() or m.issym() or m.isfifo()):
            raise ImageSourceError(f"{what}: unsupported tar entry type {m.type!r}")
        with self.root.directory(parts[:-1], create=True, what=what) as d:
            assert d is not None
            if m.isdir():
                self._dir(d, base, m)
            elif m.isreg():
                self._file(d, base, m, self.layer.data(m))
            elif m.issym():
                self._symlink(d, base, m)
            elif m.islnk():
                self._hardlink(d, base, link_parts, what)
            else:
                self._fifo(d, base, m)
            self._mark((*d.parts, base))

    # --- entry kinds -----------------------------------------------------------------
    def _dir(self, d: Dir, base: str, m: tarfile.TarInfo) -> None:
        st = lstat_at(d, base)
        if st is None or not stat.S_ISDIR(st.st_mode):
            remove_at(d, base)
            os.mkdir(base, 0o700, dir_fd=d.fd)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
        try:
            self._fd_meta(fd, m)
        finally:
            os.close(fd)
        self.dir_times.append(((*d.parts, base), _ns(m)))

    def _file(self, d: Dir, base: str, m: tarfile.TarInfo, src: IO[bytes]) -> None:
        remove_at(d, base)
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=d.fd,
        )
        try:
            with os.fdopen(fd, "wb", closefd=False) as out:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            self._fd_meta(fd, m)
            os.utime(fd, ns=(_ns(m), _ns(m)))
        finally:
            os.close(fd)

    def _symlink(self, d: Dir, base: str, m: tarfile.TarInfo) -> None:
        remove_at(d, base)
        os.symlink(m.linkname, base, dir_fd=d.fd)
        os.chown(base, m.uid, m.gid, dir_fd=d.fd, follow_symlinks=False)
        os.utime(base, ns=(_ns(m), _ns(m)), dir_fd=d.fd, follow_symlinks=False)

    def _hardlink(self, d: Dir, base: str, target: tuple[str, ...], what: str) -> None:
        shown = "/" + "/".join(target)
        with self.root.directory(target[:-1], create=False, what=what) as td:
            st = lstat_at(td, target[-1]) if td is not None else None
            if td is None or st is None:
                raise UnsafeLayerError(
                    f"{what}: hardlink to {shown}, which does not exist "
                    "(yet) in the root filesystem"
                )
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeLayerError(f"{what}: hardlink to the directory {shown}")
            if (*td.parts, target[-1]) == (*d.parts, base):
                return
            remove_at(d, base)
            os.link(target[-1], base, src_dir_fd=td.fd, dst_dir_fd=d.fd, follow_symlinks=False)

    def _fifo(self, d: Dir, base: str, m: tarfile.TarInfo) -> None:
        remove_at(d, base)
        os.mkfifo(base, 0o600, dir_fd=d.fd)
        os.chown(base, m.uid, m.gid, dir_fd=d.fd, follow_symlinks=False)
        os.chmod(base, stat.S_IMODE(m.mode), dir_fd=d.fd)  # a FIFO we just made
        os.utime(base, ns=(_ns(m), _ns(m)), dir_fd=d.fd, follow_symlinks=False)

    def _fd_meta(self, fd: int, m: tarfile.TarInfo) -> None:
        os.fchown(fd, m.uid, m.gid)  # before chmod: chown clears setuid bits
        os.fchmod(fd, stat.S_IMODE(m.mode))
        for key, value in m.pax_headers.items():
            attr = key[len(_XATTR_PREFIX) :]
            if key.startswith(_XATTR_PREFIX) and attr.startswith(_XATTRS_KEPT):
                try:
                    os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
                except OSError as err:
                    if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                        raise
                    log.warning("layer %s: cannot keep xattr %s: %s", self.layer.name, attr, err)

    # --- whiteouts ---------------------------------------------------------------------
    def _whiteout(self, parent: tuple[str, ...], name: str, what: str) -> None:
        if name in ("", ".", ".."):
            raise UnsafeLayerError(f"{what}: bad whiteout name")
        with self.root.directory(parent, create=False, what=what) as d:
            if d is None or (*d.parts, name) in self.added:
                return  # nothing below to hide, or it is this layer's own entry
            remove_at(d, name)

    def _opaque(self, parts: tuple[str, ...], what: str) -> None:
        with self.root.directory(parts, create=True, what=what) as d:
            assert d is not None
            self._clear_lower(d)
            self._mark(d.parts)

    def _clear_lower(self, d: Dir) -> None:
        for name in list_at(d):
            path = (*d.parts, name)
            if path not in self.added:
                remove_at(d, name)
                continue
            st = lstat_at(d, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                with child_dir(d, name) as sub:
                    self._clear_lower(sub)

    def _mark(self, path: tuple[str, ...]) -> None:
        for i in range(1, len(path) + 1):
            self.added.add(path[:i])

    def finish(self) -> None:
        """Set directory mtimes last: creating their entries changed them."""
        for path, ns in reversed(self.dir_times):
            with self.root.directory(path[:-1], create=False, what=f"mtime of {path}") as d:
                if d is None:
                    continue
                st = lstat_at(d, path[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(path[-1], ns=(ns, ns), dir_fd=d.fd, follow_symlinks=False)


def _ns(m: tarfile.TarInfo) -> int:
    return int(m.mtime * 1_000_000_000)
