import sqlite3
import time
from pathlib import Path

import pytest

from ember.errors import BadRequestError, SandboxNotFoundError, TemplateNotFoundError
from ember.store import SandboxRecord, Store, TemplateRecord
from ember.store.db import MIGRATIONS


def tpl(name: str = "t1") -> TemplateRecord:
    return TemplateRecord(name, "debian:bookworm", "sha256:" + "a" * 64, "/x/rootfs.ext4",
                          1 << 20, time.time(), {"oci": {"env": ["A=1"]}})


def sbx(sid: str = "sb-1", template: str = "t1") -> SandboxRecord:
    return SandboxRecord(id=sid, template=template, state="creating", vcpus=1, memory_mib=256,
                         disk_mib=512, timeout_s=60.0, created_at=time.time(), expires_at=None,
                         dir="/tmp/x", pid=None, accel="tcg", env={"A": "b"},
                         metadata={"k": "v"})


def test_templates_roundtrip(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    s.put_template(tpl())
    got = s.get_template("t1")
    assert (got.name, got.digest, got.config) == ("t1", tpl().digest, tpl().config)
    assert [t.name for t in s.list_templates()] == ["t1"]
    with pytest.raises(BadRequestError, match="already exists"):
        s.put_template(tpl())
    s.put_template(tpl(), replace=True)
    assert s.delete_template("t1").name == "t1"
    with pytest.raises(TemplateNotFoundError, match="unknown template 'nope'"):
        s.get_template("nope")


def test_sandboxes_roundtrip_and_update(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    s.add_sandbox(sbx())
    s.update_sandbox("sb-1", state="running", pid=123)
    got = s.get_sandbox("sb-1")
    assert (got.state, got.pid, got.env, got.metadata) == ("running", 123, {"A": "b"}, {"k": "v"})
    assert s.sandboxes_using_template("t1") == ["sb-1"]
    with pytest.raises(ValueError):
        s.update_sandbox("sb-1", template="other")
    with pytest.raises(SandboxNotFoundError):
        s.update_sandbox("sb-none", state="failed")
    s.delete_sandbox("sb-1")
    assert s.list_sandboxes() == []


def test_the_first_failure_of_a_sandbox_stands(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    s.add_sandbox(sbx())
    s.update_sandbox("sb-1", state="running", pid=123)
    assert s.mark_failed("sb-1", "fenced: cut off")
    assert not s.mark_failed("sb-1", "the VM process exited unexpectedly")  # a late look
    got = s.get_sandbox("sb-1")
    assert (got.state, got.error, got.pid) == ("failed", "fenced: cut off", None)
    with pytest.raises(SandboxNotFoundError):
        s.mark_failed("sb-none", "x")


def test_schema_version_and_reopen(tmp_path: Path) -> None:
    Store(tmp_path / "e.db").put_template(tpl())
    s2 = Store(tmp_path / "e.db")  # reopening does not re-run migrations
    assert s2.get_template("t1").name == "t1"
    (v,) = sqlite3.connect(tmp_path / "e.db").execute("PRAGMA user_version").fetchone()
    assert v == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "e.db")
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    from ember.errors import HostError

    with pytest.raises(HostError, match="newer than this ember"):
        Store(tmp_path / "e.db")


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path / "e.db")
    s.add_sandbox(sbx())
    with pytest.raises(sqlite3.IntegrityError):
        s.add_sandbox(sbx())  # duplicate id
    assert len(s.list_sandboxes()) == 1


def test_exposed_ports_are_kept_until_unexposed_or_their_sandbox_goes(tmp_path: Path) -> None:
    from ember.store.records import ExposedPortRecord

    s = Store(tmp_path / "e.db")
    s.add_sandbox(sbx("sb-1"))
    s.put_exposed_port(ExposedPortRecord("sb-1", 8000, 41000))
    s.put_exposed_port(ExposedPortRecord("sb-1", 8001, 41001))
    s.put_exposed_port(ExposedPortRecord("sb-2", 80, 41002, 30.0))
    s.set_idle_pause("sb-1", 5.0)
    assert s.list_exposed_ports("sb-1") == [ExposedPortRecord("sb-1", 8000, 41000, 5.0),
                                            ExposedPortRecord("sb-1", 8001, 41001, 5.0)]
    s.put_exposed_port(ExposedPortRecord("sb-1", 8000, 42000, 5.0))  # exposed again
    s.delete_exposed_ports("sb-1", 8001)
    assert s.list_exposed_ports("sb-1") == [ExposedPortRecord("sb-1", 8000, 42000, 5.0)]
    s.delete_sandbox("sb-1")  # its ports go with it
    assert Store(tmp_path / "e.db").list_exposed_ports() == [
        ExposedPortRecord("sb-2", 80, 41002, 30.0)]
    s.delete_exposed_ports("sb-2")
    assert s.list_exposed_ports() == []
