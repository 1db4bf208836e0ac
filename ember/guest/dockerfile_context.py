"""A Dockerfile's build context: ``.dockerignore``, COPY sources, their digest and tar.

Everything a COPY takes is resolved here, on the host, before anything goes to a guest:
sources are globs relative to the context; a source that is absolute, contains ``..``,
or is (or contains) a symlink whose target leaves the context is refused, naming it; the
context's files (what ``.dockerignore`` leaves) are bounded in size and count. The files
of one COPY are hashed (names, modes, link targets, contents) for the step cache and
packed as a tar that the guest unpacks at the destination.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ember.errors import DockerfileError

#: The most a context may hold (after .dockerignore): bytes (``EMBER_BUILD_CONTEXT_MAX_MIB``
#: changes it) and entries.
MAX_CONTEXT_MIB = 2048
MAX_CONTEXT_ENTRIES = 200_000


def max_context_bytes() -> int:
    raw = os.environ.get("EMBER_BUILD_CONTEXT_MAX_MIB", "")
    return (int(raw) if raw.isdigit() else MAX_CONTEXT_MIB) << 20


class ContextError(DockerfileError):
    """A build context or COPY source ember refuses (outside the context, too large)."""


@dataclass(frozen=True)
class Entry:
    rel: str  # path in the context ("" is the context itself)
    dest: str  # absolute path in the guest
    kind: str  # "file" | "dir" | "link"
    mode: int  # permission bits
    size: int = 0
    target: str = ""  # a link's target
    mtime: int = 0


class Ignore:
    """``.dockerignore`` rules: the last pattern that matches a path (or one of its parent
    directories) decides; ``!pattern`` re-includes."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in lines:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pat = line[1:].strip() if negate else line
            pat = str(PurePosixPath("/" + pat)).lstrip("/") or "."
            self.rules.append((negate, re.compile(_glob_regex(pat))))

    @classmethod
    def load(cls, root: Path) -> Ignore:
        f = root / ".dockerignore"
        try:
            return cls(f.read_text(errors="replace").splitlines()) if f.is_file() else cls(())
        except OSError as err:
            raise ContextError(f"cannot read {f}: {err}") from err

    def ignored(self, rel: str) -> bool:
        parts = rel.split("/")
        result = False
        for negate, rx in self.rules:
            for i in range(1, len(parts) + 1):
                if rx.fullmatch("/".join(parts[:i])):
                    result = not negate
                    break
        return result


def _glob_regex(pat: str) -> str:
    out, i = [], 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[":
            j = pat.find("]", i + 1)
            if j < 0:
                out.append(re.escape(pat[i]))
                i += 1
            else:
                body = pat[i + 1:j].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = j + 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return "".join(out)


class Context:
    """The context directory ``root`` with its ignore rules; :meth:`check` bounds it."""

    def __init__(self, root: Path, max_bytes: int | None = None,
                 max_entries: int = MAX_CONTEXT_ENTRIES, *, guest_links: bool = False) -> None:
        """``guest_links``: the tree came from a guest (COPY --from): its symlinks are
        copied as they are, to be read in the guest."""
        self.guest_links = guest_links
        try:
            self.root = root.resolve(strict=True)
        except OSError as err:
            raise ContextError(f"build context {root} does not exist") from err
        if not self.root.is_dir():
            raise ContextError(f"build context {root} is not a directory")
        self.ignore = Ignore.load(self.root)
        self.max_bytes = max_context_bytes() if max_bytes is None else max_bytes
        self.max_entries = max_entries

    def check(self) -> tuple[int, int]:
        """(bytes, entries) of the context's files that are not ignored; raises if over
        the bound."""
        size = count = 0
        for rel, st in self._walk(""):
            count += 1
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
            if size > self.max_bytes or count > self.max_entries:
                raise ContextError(
                    f"build context {self.root} is larger than the bound of "
                    f"{self.max_bytes >> 20} MiB / {self.max_entries} entries (stopped at "
                    f"{rel}); list what the build does not need in .dockerignore")
        return size, count

    def _walk(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        """Every non-ignored entry under ``rel`` (not following symlinks), sorted."""
        base = self.root / rel if rel else self.root
        try:
            names = sorted(os.listdir(base))
        except OSError as err:
            raise ContextError(f"cannot list {base}: {err}") from err
        for name in names:
            child = f"{rel}/{name}" if rel else name
            if self.ignore.ignored(child):
                continue
            st = os.lstat(self.root / child)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                yield from self._walk(child)

    def resolve(self, sources: Sequence[str], dest: str) -> list[Entry]:
        """The entries one COPY takes, with their destinations (Docker's rules: a
        directory's contents go into the destination; a file goes to the destination, or
        into it when it ends with ``/``)."""
        matched: list[str] = []
        for src in sources:
            if src.startswith("/") or ".." in src.split("/"):
                raise ContextError(f"COPY source {src!r} is outside the build context")
            pat = str(PurePosixPath("/" + src)).lstrip("/")
            if pat in ("", "."):
                hits = [""]
            elif any(c in pat for c in "*?["):
                hits = [rel for rel, _ in self._walk("") if fnmatch.fnmatchcase(rel, pat)
                        and rel.count("/") == pat.count("/")]
            else:
                parent = (self.root / pat).parent.resolve()
                if not parent.is_relative_to(self.root):
                    raise ContextError(f"COPY source {src!r} goes through a symlink that "
                                       "leaves the build context")
                hits = [pat] if (os.path.lexists(self.root / pat)
                                 and not self.ignore.ignored(pat)) else []
            if not hits:
                raise ContextError(f"COPY source {src!r} matches nothing in the build context "
                                   "(or only what .dockerignore excludes)")
            matched.extend(hits)
        to_dir = dest.endswith("/") or len(matched) > 1
        out: list[Entry] = []
        for rel in matched:
            st = self._lstat(rel)
            if stat.S_ISDIR(st.st_mode):
                root = dest.rstrip("/") or "/"
                for sub, sst in self._walk(rel):
                    tail = sub[len(rel):].lstrip("/") if rel else sub
                    out.append(self._entry(sub, sst, _join(root, tail)))
            else:
                name = rel.rsplit("/", 1)[-1]
                out.append(self._entry(rel, st, _join(dest, name) if to_dir else dest))
        return out

    def _lstat(self, rel: str) -> os.stat_result:
        try:
            return os.lstat(self.root / rel if rel else self.root)
        except OSError as err:
            raise ContextError(f"cannot read {rel!r} in the build context: {err}") from err

    def _entry(self, rel: str, st: os.stat_result, dest: str) -> Entry:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            return Entry(rel, dest, "dir", mode, mtime=int(st.st_mtime))
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(self.root / rel)
            if self.guest_links:
                return Entry(rel, dest, "link", 0o777, target=target, mtime=int(st.st_mtime))
            where = (self.root / rel).parent
            resolved = Path(os.path.normpath(target if target.startswith("/")
                                             else where / target))
            if not resolved.is_relative_to(self.root):
                raise ContextError(f"symlink {rel!r} -> {target!r} leaves the build context")
            if target.startswith("/"):  # would mean the guest's path: make it relative
                target = os.path.relpath(resolved, where)
            return Entry(rel, dest, "link", 0o777, target=target, mtime=int(st.st_mtime))
        if stat.S_ISREG(st.st_mode):
            return Entry(rel, dest, "file", mode, size=st.st_size, mtime=int(st.st_mtime))
        raise ContextError(f"{rel!r} in the build context is not a file, directory or symlink")

    def digest(self, entries: Sequence[Entry]) -> str:
        """Content digest of what a COPY takes: names, kinds, modes, targets, bytes."""
        h = hashlib.sha256()
        for e in entries:
            h.update(f"{e.dest}\0{e.kind}\0{e.mode:o}\0{e.target}\0{e.size}\0".encode())
            if e.kind == "file":
                with open(self.root / e.rel, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
        return h.hexdigest()

    def write_tar(self, entries: Sequence[Entry], out: Path, chmod: int | None) -> None:
        """A tar of ``entries`` with absolute destinations (root-owned; ``chmod`` applied
        to files and directories)."""
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                info = tarfile.TarInfo(e.dest.lstrip("/") or ".")
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = e.mtime
                info.mode = chmod if chmod is not None and e.kind != "link" else e.mode
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "link":
                    info.type = tarfile.SYMTYPE
                    info.linkname = e.target
                    tar.addfile(info)
                else:
                    info.size = e.size
                    with open(self.root / e.rel, "rb") as f:
                        tar.addfile(info, f)


def _join(dest: str, tail: str) -> str:
    if not tail:
        return dest.rstrip("/") or "/"
    return f"{dest.rstrip('/')}/{tail}"


def extract_guest_tar(tar: Path, root: Path, max_bytes: int | None = None,
                      max_entries: int = MAX_CONTEXT_ENTRIES) -> None:
    """Unpack a tar a guest made (COPY --from: hostile input) into the empty directory
    ``root``, refusing what could write outside it: absolute names, ``..``, a parent that
    is a symlink, hard links and special files; symlinks are created, never followed.
    Bounded like a context. Raises ContextError (also for a tar that cannot be read)."""
    bound = max_context_bytes() if max_bytes is None else max_bytes
    total = count = 0
    try:
        with tarfile.open(tar) as t:
            for m in t:
                count += 1
                if count > max_entries:
                    raise ContextError(f"COPY --from: more than {max_entries} entries")
                if m.isreg():
                    total += m.size
                    if total > bound:
                        raise ContextError(f"COPY --from: more than {bound >> 20} MiB")
                _extract_one(t, m, root)
    except (OSError, tarfile.TarError) as err:
        raise ContextError(f"COPY --from: cannot unpack what the stage gave: {err}") from err


def _extract_one(t: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> None:
    parts = [p for p in m.name.split("/") if p not in ("", ".")]
    if m.name.startswith("/") or ".." in parts:
        raise ContextError(f"COPY --from: {m.name!r} leaves the copied tree")
    if not parts:
        return
    parent = root
    for p in parts[:-1]:
        parent = parent / p
        if parent.is_symlink():
            raise ContextError(f"COPY --from: {m.name!r} goes through a symlink")
        if not parent.exists():
            parent.mkdir(mode=0o755)
    dest = parent / parts[-1]
    if m.isdir():
        if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
            dest.unlink()
        if not dest.is_dir():
            dest.mkdir(mode=0o755)
        dest.chmod(m.mode & 0o777)
    elif m.issym() or m.isreg():
        if dest.is_dir() and not dest.is_symlink():
            raise ContextError(f"COPY --from: {m.name!r} replaces a directory")
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        if m.issym():
            os.symlink(m.linkname, dest)
            return
        src = t.extractfile(m)
        if src is None:
            raise ContextError(f"COPY --from: cannot read {m.name!r}")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        os.chmod(dest, m.mode & 0o777)
    else:
        raise ContextError(f"COPY --from: {m.name!r} is not a file, directory or symlink")
    os.utime(dest, (m.mtime, m.mtime), follow_symlinks=False)


def is_archive(path: Path) -> bool:
    """Whether ADD unpacks ``path``: a tar archive, plain or compressed with gzip, bzip2
    or xz (what Python's tarfile and the guest's tar both read)."""
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False
