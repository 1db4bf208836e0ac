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

from ember.errors import (
    BadRequestError,
    HostError,
    NotFoundError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
)
from ember.store.records import (
    ApiKeyRecord,
    ExposedPortRecord,
    PoolRecord,
    SandboxRecord,
    SnapshotRecord,
    TemplateRecord,
    TenantRecord,
    dumps,
)

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
    # 2: snapshots, restored and pooled sandboxes, warm pools
    """
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        name TEXT UNIQUE,
        template TEXT NOT NULL,
        template_digest TEXT NOT NULL,
        kernel_key TEXT NOT NULL,
        vmm_version TEXT NOT NULL,
        accel TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER NOT NULL,
        ram_file INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        created_at REAL NOT NULL,
        source TEXT NOT NULL,
        env TEXT NOT NULL DEFAULT '{}',
        metadata TEXT NOT NULL DEFAULT '{}',
        verified TEXT
    );
    ALTER TABLE sandboxes ADD COLUMN snapshot TEXT;
    ALTER TABLE sandboxes ADD COLUMN pool TEXT;
    CREATE TABLE pools (
        key TEXT PRIMARY KEY,
        template TEXT NOT NULL,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        disk_mib INTEGER,
        size INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # 3: what to do when a sandbox's lifetime ends
    """
    ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT 'destroy';
    """,
    # 4: isolation tiers (microvm, gvisor, container)
    """
    ALTER TABLE sandboxes ADD COLUMN isolation TEXT NOT NULL DEFAULT 'microvm';
    """,
    # 5: the daemon's API keys (only a hash of each secret) and tenants' quotas
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        secret_sha256 TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        max_sandboxes INTEGER,
        max_vcpus INTEGER,
        max_memory_mib INTEGER
    );
    """,
    # 6: a sandbox's network policy (JSON; NULL: no network)
    """
    ALTER TABLE sandboxes ADD COLUMN network TEXT;
    """,
    # 7: exposed ports, exposed again by a restarted daemon
    """
    CREATE TABLE exposed_ports (
        sandbox_id TEXT NOT NULL,
        port INTEGER NOT NULL,
        host_port INTEGER NOT NULL,
        pause_after_idle_s REAL,
        PRIMARY KEY (sandbox_id, port)
    );
    """,
)

_SANDBOX_COLS = (
    "id, template, state, vcpus, memory_mib, disk_mib, timeout_s, created_at, expires_at, "
    "dir, pid, accel, env, metadata, error, snapshot, pool, on_timeout, isolation, network"
)
_SNAPSHOT_COLS = (
    "id, name, template, template_digest, kernel_key, vmm_version, accel, vcpus, memory_mib, "
    "disk_mib, ram_file, size_bytes, created_at, source, env, metadata, verified"
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
            # WAL + NORMAL: a commit does not wait for fsync (a power cut may lose the
            # last transactions, never corrupt the database); the registry describes
            # processes that a power cut ends anyway.
            self._db.execute("PRAGMA synchronous=NORMAL")
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
                f"INSERT INTO sandboxes ({_SANDBOX_COLS}) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.template, rec.state, rec.vcpus, rec.memory_mib, rec.disk_mib,
                 rec.timeout_s, rec.created_at, rec.expires_at, rec.dir, rec.pid, rec.accel,
                 dumps(rec.env), dumps(rec.metadata), rec.error, rec.snapshot, rec.pool,
                 rec.on_timeout, rec.isolation,
                 None if rec.network is None else dumps(rec.network)),
            )

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> None:
        allowed = {"state", "pid", "error", "expires_at", "timeout_s", "env", "metadata",
                   "pool", "on_timeout", "network"}
        for key in ("env", "metadata", "network"):
            if key in fields:
                fields[key] = dumps(fields[key])
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"cannot update sandbox fields {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            cur = db.execute(f"UPDATE sandboxes SET {sets} WHERE id=?",
                             (*fields.values(), sandbox_id))
            if cur.rowcount == 0:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")

    def mark_failed(self, sandbox_id: str, error: str | None) -> bool:
        """Move a live sandbox to ``failed`` with ``error``, in one statement; False when
        it is failed already (its first cause stands: two releases racing, say a client's
        look at a dead VM and the kill that made it dead, keep the kill's reason)."""
        with self._tx() as db:
            cur = db.execute("UPDATE sandboxes SET state='failed', error=?, pid=NULL "
                             "WHERE id=? AND state != 'failed'", (error, sandbox_id))
            if cur.rowcount:
                return True
            if db.execute("SELECT 1 FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone() \
                    is None:
                raise SandboxNotFoundError(f"no sandbox {sandbox_id!r}")
            return False

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
            db.execute("DELETE FROM exposed_ports WHERE sandbox_id=?", (sandbox_id,))

    def sandboxes_using_template(self, name: str) -> list[str]:
        rows = self._all("SELECT id FROM sandboxes WHERE template=?", (name,))
        return [r[0] for r in rows]

    def sandboxes_using_snapshot(self, snapshot_id: str) -> list[str]:
        rows = self._all("SELECT id FROM sandboxes WHERE snapshot=?", (snapshot_id,))
        return [r[0] for r in rows]

    def claim_pooled(self, pool: str, *, timeout_s: float | None, env: dict[str, str],
                     metadata: dict[str, str], now: float,
                     on_timeout: str = "destroy") -> SandboxRecord | None:
        """Hand out one ready sandbox of ``pool``, atomically: it leaves the pool in the
        same transaction that finds it, so no two callers (in any process) get the same."""
        with self._tx() as db:
            row = db.execute(
                "SELECT id, env FROM sandboxes WHERE pool=? AND state='pooled' "
                "ORDER BY created_at LIMIT 1", (pool,)).fetchone()
            if row is None:
                return None
            expires = now + timeout_s if timeout_s is not None else None
            db.execute(
                "UPDATE sandboxes SET state='running', pool=NULL, timeout_s=?, expires_at=?, "
                "env=?, metadata=?, on_timeout=? WHERE id=? AND state='pooled'",
                (timeout_s, expires, dumps({**json.loads(row[1]), **env}), dumps(metadata),
                 on_timeout, row[0]))
            got = db.execute(f"SELECT {_SANDBOX_COLS} FROM sandboxes WHERE id=?",
                             (row[0],)).fetchone()
        return _sandbox(got)

    # exposed ports ----------------------------------------------------------------------
    def put_exposed_port(self, rec: ExposedPortRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO exposed_ports (sandbox_id, port, host_port, "
                       "pause_after_idle_s) VALUES (?,?,?,?)",
                       (rec.sandbox_id, rec.port, rec.host_port, rec.pause_after_idle_s))

    def list_exposed_ports(self, sandbox_id: str | None = None) -> list[ExposedPortRecord]:
        sql = "SELECT sandbox_id, port, host_port, pause_after_idle_s FROM exposed_ports"
        rows = (self._all(sql + " ORDER BY sandbox_id, port") if sandbox_id is None else
                self._all(sql + " WHERE sandbox_id=? ORDER BY port", (sandbox_id,)))
        return [ExposedPortRecord(str(s), int(p), int(h), None if i is None else float(i))
                for s, p, h, i in rows]

    def delete_exposed_ports(self, sandbox_id: str, port: int | None = None) -> None:
        """Forget one exposed port of a sandbox (all of them if ``port`` is None)."""
        with self._tx() as db:
            if port is None:
                db.execute("DELETE FROM exposed_ports WHERE sandbox_id=?", (sandbox_id,))
            else:
                db.execute("DELETE FROM exposed_ports WHERE sandbox_id=? AND port=?",
                           (sandbox_id, port))

    def set_idle_pause(self, sandbox_id: str, seconds: float | None) -> None:
        """The idle period of every exposed port of a sandbox (it is the sandbox's)."""
        with self._tx() as db:
            db.execute("UPDATE exposed_ports SET pause_after_idle_s=? WHERE sandbox_id=?",
                       (seconds, sandbox_id))

    # API keys and tenants -----------------------------------------------------------------
    def add_api_key(self, rec: ApiKeyRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (id, tenant, secret_sha256, created_at, revoked_at)"
                       " VALUES (?,?,?,?,?)", (rec.id, rec.tenant, rec.secret_sha256,
                                               rec.created_at, rec.revoked_at))

    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = self._one("SELECT id, tenant, secret_sha256, created_at, revoked_at FROM api_keys"
                        " WHERE id=?", (key_id,))
        return ApiKeyRecord(*row) if row else None

    def list_api_keys(self) -> list[ApiKeyRecord]:
        rows = self._all("SELECT id, tenant, secret_sha256, created_at, revoked_at FROM "
                         "api_keys ORDER BY created_at")
        return [ApiKeyRecord(*r) for r in rows]

    def revoke_api_key(self, key_id: str, now: float) -> ApiKeyRecord:
        with self._tx() as db:
            db.execute("UPDATE api_keys SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                       (now, key_id))
        rec = self.get_api_key(key_id)
        if rec is None:
            raise NotFoundError(f"no API key {key_id!r} (see `ember apikey ls`)")
        return rec

    def put_tenant(self, rec: TenantRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO tenants (name, max_sandboxes, max_vcpus, "
                       "max_memory_mib) VALUES (?,?,?,?)",
                       (rec.name, rec.max_sandboxes, rec.max_vcpus, rec.max_memory_mib))

    def get_tenant(self, name: str) -> TenantRecord | None:
        row = self._one("SELECT name, max_sandboxes, max_vcpus, max_memory_mib FROM tenants "
                        "WHERE name=?", (name,))
        return TenantRecord(*row) if row else None

    def list_tenants(self) -> list[TenantRecord]:
        rows = self._all("SELECT name, max_sandboxes, max_vcpus, max_memory_mib FROM tenants "
                         "ORDER BY name")
        return [TenantRecord(*r) for r in rows]

    # snapshots ------------------------------------------------------------------------
    def add_snapshot(self, rec: SnapshotRecord) -> SnapshotRecord:
        """Register ``rec``; if the same content is registered already, return that row
        (naming it if it has no name)."""
        with self._tx() as db:
            if rec.name is not None:
                taken = db.execute("SELECT id FROM snapshots WHERE name=?", (rec.name,)).fetchone()
                if taken is not None and taken[0] != rec.id:
                    raise BadRequestError(f"a snapshot named {rec.name!r} exists already "
                                          "(remove it first with `ember snapshot rm`)")
            row = db.execute(f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE id=?",
                             (rec.id,)).fetchone()
            if row is not None:
                if rec.name is not None and row[1] is None:
                    db.execute("UPDATE snapshots SET name=? WHERE id=?", (rec.name, rec.id))
            else:
                db.execute(
                    f"INSERT INTO snapshots ({_SNAPSHOT_COLS}) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.id, rec.name, rec.template, rec.template_digest, rec.kernel_key,
                     rec.vmm_version, rec.accel, rec.vcpus, rec.memory_mib, rec.disk_mib,
                     int(rec.ram_file), rec.size_bytes, rec.created_at, rec.source,
                     dumps(rec.env), dumps(rec.metadata), rec.verified))
            got = db.execute(f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE id=?",
                             (rec.id,)).fetchone()
        return _snapshot(got)

    def get_snapshot(self, ref: str) -> SnapshotRecord:
        """A snapshot by name, full id, or an unambiguous id prefix (at least 6 digits)."""
        row = self._one(f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE name=? OR id=?",
                        (ref, ref))
        if row is None and len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            rows = self._all(f"SELECT {_SNAPSHOT_COLS} FROM snapshots WHERE id LIKE ?",
                             (ref + "%",))
            if len(rows) > 1:
                raise BadRequestError(f"snapshot id prefix {ref!r} is ambiguous")
            row = rows[0] if rows else None
        if row is None:
            raise SnapshotNotFoundError(f"no snapshot {ref!r} (see `ember snapshot ls`)")
        return _snapshot(row)

    def list_snapshots(self) -> list[SnapshotRecord]:
        rows = self._all(f"SELECT {_SNAPSHOT_COLS} FROM snapshots ORDER BY created_at")
        return [_snapshot(r) for r in rows]

    def set_snapshot_verified(self, snapshot_id: str, verified: str | None) -> None:
        with self._tx() as db:
            db.execute("UPDATE snapshots SET verified=? WHERE id=?", (verified, snapshot_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    # pools ----------------------------------------------------------------------------
    def put_pool(self, rec: PoolRecord) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO pools VALUES (?,?,?,?,?,?,?)",
                       (rec.key, rec.template, rec.vcpus, rec.memory_mib, rec.disk_mib,
                        rec.size, rec.created_at))

    def list_pools(self) -> list[PoolRecord]:
        return [PoolRecord(*r) for r in self._all("SELECT * FROM pools ORDER BY key")]

    def get_pool(self, key: str) -> PoolRecord | None:
        row = self._one("SELECT * FROM pools WHERE key=?", (key,))
        return PoolRecord(*row) if row is not None else None

    def delete_pool(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pools WHERE key=?", (key,))


def _template(row: tuple[Any, ...]) -> TemplateRecord:
    name, source, digest, image_path, size, created, config = row
    return TemplateRecord(name, source, digest, image_path, int(size), float(created),
                          json.loads(config))


def _sandbox(row: tuple[Any, ...]) -> SandboxRecord:
    (sid, template, state, vcpus, mem, disk, timeout_s, created, expires, d, pid, accel, env,
     metadata, error, snapshot, pool, on_timeout, isolation, network) = row
    return SandboxRecord(
        id=sid, template=template, state=state, vcpus=int(vcpus), memory_mib=int(mem),
        disk_mib=int(disk), timeout_s=timeout_s, created_at=float(created), expires_at=expires,
        dir=d, pid=pid, accel=accel, env=json.loads(env), metadata=json.loads(metadata),
        error=error, snapshot=snapshot, pool=pool, on_timeout=on_timeout, isolation=isolation,
        network=None if network is None else json.loads(network),
    )


def _snapshot(row: tuple[Any, ...]) -> SnapshotRecord:
    (sid, name, template, tdigest, kernel_key, vmm, accel, vcpus, mem, disk, ram_file, size,
     created, source, env, metadata, verified) = row
    return SnapshotRecord(
        id=sid, name=name, template=template, template_digest=tdigest, kernel_key=kernel_key,
        vmm_version=vmm, accel=accel, vcpus=int(vcpus), memory_mib=int(mem),
        disk_mib=int(disk), ram_file=bool(ram_file), size_bytes=int(size),
        created_at=float(created), source=source, env=json.loads(env),
        metadata=json.loads(metadata), verified=verified,
    )
