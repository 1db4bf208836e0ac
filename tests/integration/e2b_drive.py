"""Drives a daemon with whatever ``e2b`` release the running interpreter has (run by
test_e2b.py, with E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL set): only calls that
every release since 2.7.0 (the first with E2B_SANDBOX_URL) has."""

from __future__ import annotations

from e2b import CommandExitException, Sandbox, SandboxException, SandboxQuery

sb = Sandbox.create("base", timeout=300, metadata={"drive": "1"})
try:
    seen: list[str] = []
    r = sb.commands.run("echo hi; echo err >&2", on_stdout=seen.append)
    assert (r.exit_code, r.stdout, r.stderr, seen) == (0, "hi\n", "err\n", ["hi\n"]), r
    try:
        sb.commands.run("exit 4")
        raise AssertionError("exit 4 did not raise")
    except CommandExitException as e:
        assert e.exit_code == 4
    h = sb.commands.run("head -n1", background=True, stdin=True)
    sb.commands.send_stdin(h.pid, "in\n")
    assert h.wait().stdout == "in\n"
    s = sb.commands.run("sleep 100", background=True)
    assert sb.commands.kill(s.pid) is True and sb.commands.kill(s.pid) is False
    sb.files.write("/tmp/x/a.txt", "hello")
    assert sb.files.read("/tmp/x/a.txt") == "hello"
    assert [e.name for e in sb.files.list("/tmp/x")] == ["a.txt"]
    assert sb.files.make_dir("/tmp/x/d") is True and sb.files.make_dir("/tmp/x/d") is False
    sb.files.rename("/tmp/x/a.txt", "/tmp/x/d/b.txt")
    sb.files.remove("/tmp/x/d")
    assert not sb.files.exists("/tmp/x/d/b.txt")
    listed = Sandbox.list(query=SandboxQuery(metadata={"drive": "1"})).next_items()
    assert [i.sandbox_id for i in listed] == [sb.sandbox_id]
    sb.set_timeout(600)
    again = Sandbox.connect(sb.sandbox_id)
    assert again.commands.run("echo back").stdout == "back\n"
    try:
        Sandbox.create("no-such-template")
        raise AssertionError("an unknown template was accepted")
    except SandboxException as e:
        assert "404" in str(e), e
finally:
    assert sb.kill() is True
assert Sandbox.kill(sb.sandbox_id) is False
print("ok")
