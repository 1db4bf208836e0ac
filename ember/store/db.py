"""SQLite registry with numbered schema migrations (``PRAGMA user_version``).

Every write is one short transaction; WAL mode and a busy timeout let several ember
processes (CLI, SDK users, tests) share one home safely.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ember.errors import BadRequestError, HostError, SandboxNotFoundError, TemplateNotFoundError
from ember.store.records import SandboxRecord, TemplateRecord, dumps

MIGRATIONS: tuple[str, ...] = (
    # 1: templates and sandboxes
    """
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        source TEXT NOT NULL,
        digest TEXT NOT NULL,
        image_path TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        config TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        template TEXT NOT NULL,
        state TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        timeout_s REAL,
        created_at REAL NOT NULL,
        expires_at REAL,
        dir TEXT NOT NULL,
        pid INTEGER,
        accel TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}',
        error TEXT
    );
    """,
)

_SANDBOX_COLS = (
    "id, template, state, vcpus, memory_mib, disk_mib, timeout_s, created_at, expires_at, "
    "dir, pid, accel, env, metadata, error"
)


class Store:
    """The registry of one ember home. Cheap to open; safe to share between processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._migrate()
        except sqlite3.Error as err:
            raise HostError(f"cannot open ember registry {path}: {err}") from err

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _migrate(self) -> None:
        with self._tx() as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > len(MIGRATIONS):
                raise HostError(
                    f"ember registry {self.path} has schema {version}, newer than this ember "
                    f"({len(MIGRATIONS)}); upgrade ember"
                )
            for i in range(version, len(MIGRATIONS)):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version={i + 1}")

    # templates ------------------------------------------------------------------------
    def put_template(self, rec: TemplateRecord, *, replace: bool = False) -> None:
        with self._tx() as db:
            exists = db.execute("SELECT 1 FROM templates WHERE name=?", (rec.name,)).fetchone()
            if exists and not replace:
                raise BadRequestError(
                    f"template {rec.name!r} already exists (use --force to replace it)"
                )
            db.execute(
                "INSERT OR REPLACE INTO templates VALUES (?,?,?,?,?,?,?)",
                (rec.name, rec.source, rec.digest, rec.image_path, rec.size_bytes,
                 rec.created_at, dumps(rec.config)),
            )

    def get_template(self, name: str) -> TemplateRecord:
        row = self._one("SELECT * FROM templates WHERE name=?", (name,))
        if row is None:
            raise TemplateNotFoundError(
                f"unknown template {name!r} (see `ember image ls`; build it with "
                f"`ember image build {name} --from SOURCE`)"
            )
        return _template(row)

    def list_templates(self) -> list[TemplateRecord]:
        rows = self._all("SELECT * FROM templates ORDER BY name")
        return [_template(r) for r in rows]

    def delete_template(self, name: str) -> TemplateRecord:
        with self._tx() as db:
            row = db.execute("SELECT * FROM templates WHERE name=?", (name,)).fetchone()
            if row is None:
                raise TemplateNotFoundError(f"unknown template {name!r}")
            db.execute("DELETE FROM templates WHERE name=?", (name,))
            return _template(row)

    def template_image_in_use(self, image_path: str) -> bool:
        row = self._one(
            "SELECT 1 FROM templates WHERE image_path=?", (image_path,)
        )
        return row is not None

    # sandboxes ------------------------------------------------------------------------
    def add_sandbox(self, rec: SandboxRecord) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT INTO sandboxes ({_SANDBOX_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.template, rec.state, rec.vcpus, rec.memory_mib, rec.disk_mib,
                 rec.timeout_s, rec.created_at, rec.expires_at, rec.dir, rec.pid, rec.accel,
                 dumps(rec.env), dumps(rec.metadata), rec.error),
            )

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> None:
        allowed = {"state", "pid", "error", "expires_at", "timeout_s"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update sandbox fields {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(f"UPDATE sandboxes SET {sets} WHERE id=?",
                             (*fields.values(), sandbox_id))
            if cur.rowcount == 0:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")

    def get_sandbox(self, sandbox_id: str) -> SandboxRecord:
        row = self._one(
            f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE id=?", (sandbox_id,)
        )
        if row is None:
            raise SandboxNotFoundError(f"no sandbox {sandbox_id!r} (see `ember ls`)")
        return _sandbox(row)

    def list_sandboxes(self) -> list[SandboxRecord]:
        rows = self._all(
            f"SELECT {_SANDBOX_COLS} FROM sandboxes ORDER BY created_at"
        )
        return [_sandbox(r) for r in rows]

    def delete_sandbox(self, sandbox_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def sandboxes_using_template(self, name: str) -> list[str]:
        rows = self._all("SELECT id FROM sandboxes WHERE template=?", (name,))
        return [r[0] for r in rows]


def _template(row: tuple[Any, ...]) -> TemplateRecord:
    name, source, digest, image_path, size, created, config = row
    return TemplateRecord(name, source, digest, image_path, int(size), float(created),
                          json.loads(config))


def _sandbox(row: tuple[Any, ...]) -> SandboxRecord:
    (sid, template, state, vcpus, mem, disk, timeout_s, created, expires, d, pid, accel, env,
     metadata, error) = row
    return SandboxRecord(
        id=sid, template=template, state=state, vcpus=int(vcpus), memory_mib=int(mem),
        disk_mib=int(disk), timeout_s=timeout_s, created_at=float(created), expires_at=expires,
        dir=d, pid=pid, accel=accel, env=json.loads(env), metadata=json.loads(metadata),
        error=error,
    )
