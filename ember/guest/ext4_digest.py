"""The digest of a template's ext4 image, computed from the image itself: what the tree
inside it hashes to (:func:`ember.guest.digest.tree_digest`, the digest a build records and
names ``images/<digest>/`` by), so that an image that came from elsewhere (another node of
a cluster) is checked before it is registered.

Nothing is mounted (a hostile image never reaches the host's kernel): e2fsprogs' debugfs,
a user-space reader, lists every directory by inode (``ls -p``: mode, owner and group of
each entry), one depth per run, which refuses a name that could not be a file's (a "/" or
a newline in a crafted image) before anything is written; then it dumps the tree
(``rdump``: contents, directories, symbolic links) into a work directory, which gets those
modes and owners and is hashed as a build hashes its root. ``mkfs.ext4 -d`` adds an
empty ``/lost+found``, which is left out. Device nodes cannot be checked this way (the
builds put none outside ``/dev``, which they empty): an image holding one is refused.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ember import proc
from ember.errors import HostCommandError, TemplateDigestError
from ember.guest.digest import tree_digest

#: debugfs's run bounds (one dump, one listing per depth).
DUMP_TIMEOUT_S = 900.0
LIST_TIMEOUT_S = 300.0
MAX_DEPTH = 256
#: Entries an image may hold (a Debian template has tens of thousands).
MAX_ENTRIES = 2_000_000


@dataclass(frozen=True)
class Entry:
    inode: int
    mode: int
    uid: int
    gid: int
    name: str


def parse_listing(text: str) -> dict[int, list[Entry]]:
    """The output of debugfs ``ls -p <ino>`` commands run from a command file: each
    listed directory's inode -> its entries (``.`` and ``..`` left out). Pure; a line
    that does not parse raises :class:`TemplateDigestError`."""
    out: dict[int, list[Entry]] = {}
    current: int | None = None
    for line in text.splitlines():
        if line.startswith("debugfs: ls -p <") and line.endswith(">"):
            current = int(line[len("debugfs: ls -p <"):-1])
            out[current] = []
            continue
        if not line.strip() or current is None:
            continue
        parts = line.split("/")
        # "/ino/mode/uid/gid/name/size/": a name cannot hold "/", so 8 fields exactly
        if len(parts) != 8 or parts[0] or parts[7]:
            raise TemplateDigestError(f"cannot read the image's listing: {line[:200]!r}")
        try:
            ino, mode, uid, gid = int(parts[1]), int(parts[2], 8), int(parts[3]), int(parts[4])
        except ValueError as err:
            raise TemplateDigestError(f"cannot read the image's listing: {line[:200]!r}") \
                from err
        if parts[5] in (".", "..") or not parts[5]:
            continue
        out[current].append(Entry(ino, mode, uid, gid, parts[5]))
    return out


def image_digest(image: Path, work: Path) -> str:
    """The tree digest of ext4 ``image``, using ``work`` (an empty directory on a
    filesystem with room for the tree; left for the caller to remove)."""
    # Listed first: a name rdump would write outside the work directory (a "/" in a name
    # of a crafted image) does not parse, and the image is refused before any dump.
    metadata = _list_tree(image, work)
    tree = work / "tree"
    tree.mkdir()
    try:
        proc.run(["debugfs", "-R", f"rdump / {tree}", str(image)],
                 what="dump the image's tree (debugfs rdump)", timeout=DUMP_TIMEOUT_S)
    except HostCommandError as err:
        raise TemplateDigestError(f"cannot read the image: {err}") from err
    for rel, e in metadata.items():
        path = tree / rel
        kind = stat.S_IFMT(e.mode)
        if kind in (stat.S_IFIFO, stat.S_IFSOCK) and not path.exists():
            os.mknod(path, kind | 0o600)  # rdump skips them
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise TemplateDigestError(f"the image holds a device node (/{rel}): cannot be "
                                      "checked")
        if not os.path.lexists(path):
            raise TemplateDigestError(f"the image's /{rel} could not be read")
        os.lchown(path, e.uid, e.gid)
        if kind != stat.S_IFLNK:
            os.chmod(path, stat.S_IMODE(e.mode))
    lost = tree / "lost+found"
    if "lost+found" in metadata and lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()  # mkfs.ext4's, not the template's
    return tree_digest(tree)


def _list_tree(image: Path, work: Path) -> dict[str, Entry]:
    """Every entry of the image (relative path -> its listing), one debugfs run per
    depth, directories named by inode (no quoting of odd names needed)."""
    out: dict[str, Entry] = {}
    level: dict[int, str] = {2: ""}  # the root directory's inode is 2 in ext4
    for _ in range(MAX_DEPTH):
        if not level:
            return out
        cmds = work / "ls.cmds"
        cmds.write_text("".join(f"ls -p <{ino}>\n" for ino in level))
        try:
            got = proc.run(["debugfs", "-f", str(cmds), str(image)],
                           what="list the image's directories (debugfs ls -p)",
                           timeout=LIST_TIMEOUT_S)
        except HostCommandError as err:
            raise TemplateDigestError(f"cannot read the image: {err}") from err
        listing = parse_listing(got.stdout)
        nxt: dict[int, str] = {}
        for ino, prefix in level.items():
            if ino not in listing:
                raise TemplateDigestError(f"debugfs did not list directory /{prefix}")
            for e in listing[ino]:
                rel = f"{prefix}/{e.name}" if prefix else e.name
                out[rel] = e
                if stat.S_ISDIR(e.mode):
                    nxt[e.inode] = rel
        if len(out) > MAX_ENTRIES:
            raise TemplateDigestError(f"the image holds more than {MAX_ENTRIES} entries")
        level = nxt
    raise TemplateDigestError(f"the image's tree is deeper than {MAX_DEPTH}")


def remove_tree(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
