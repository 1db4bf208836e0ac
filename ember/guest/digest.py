"""Content digest of a root filesystem tree: what a template *is*, independent of ext4 layout.

The digest covers every entry's path, type, mode, owner, size and content (or link target),
in sorted order, so two trees with the same digest boot the same guest.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

EXCLUDE = frozenset({".ember/image.json"})


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for rel, st in _walk(root):
        if rel in EXCLUDE:
            continue
        kind = stat.S_IFMT(st.st_mode)
        h.update(f"{rel}\0{kind:o}\0{stat.S_IMODE(st.st_mode):o}\0{st.st_uid}\0{st.st_gid}\0"
                 .encode("utf-8", "surrogateescape"))
        full = root / rel
        if stat.S_ISREG(st.st_mode):
            h.update(str(st.st_size).encode() + b"\0")
            h.update(_file_sha(full))
        elif stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(full).encode("utf-8", "surrogateescape"))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            h.update(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}".encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes of regular file content, number of entries) under root, hardlinks counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    count = 0
    for _rel, st in _walk(root):
        count += 1
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total, count


def _walk(root: Path) -> list[tuple[str, os.stat_result]]:
    out: list[tuple[str, os.stat_result]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            st = e.stat(follow_symlinks=False)
            out.append((rel, st))
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)
    out.sort(key=lambda x: x[0])
    return out


def _file_sha(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()
