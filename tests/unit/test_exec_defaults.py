"""A template image's ENV, WORKDIR, USER and command as defaults of its sandboxes' execs."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ember.runtime.exec_defaults import NONE, exec_defaults, image_command, parse_user

OCI = {"oci": {"env": ["PATH=/opt/bin:/usr/bin:/bin", "APP=1", "EMPTY="],
               "working_dir": "/app", "user": "nobody:nogroup",
               "entrypoint": ["python3"], "cmd": ["-m", "http.server"],
               "exposed_ports": ["8000/tcp"]}}


def test_the_callers_values_win_over_the_images() -> None:
    d = exec_defaults(OCI)
    assert d.env == {"PATH": "/opt/bin:/usr/bin:/bin", "APP": "1", "EMPTY": ""}
    assert d.cwd == "/app" and d.user == "nobody"
    assert d.command == ("python3", "-m", "http.server")
    env, cwd, user = d.apply(None, None, None)
    assert env == d.env and cwd == "/app" and user == "nobody"
    env, cwd, user = d.apply({"APP": "2", "MORE": "x"}, "/tmp", 0)  # root by uid 0
    assert env["APP"] == "2" and env["MORE"] == "x" and env["PATH"].startswith("/opt")
    assert cwd == "/tmp" and user == 0


def test_templates_without_image_metadata_keep_embers_defaults() -> None:
    for config in ({}, {"oci": {}}, {"oci": None}, {"oci": "x"}, None):
        assert exec_defaults(config) == NONE
        assert NONE.apply({"A": "1"}, None, None) == ({"A": "1"}, None, None)
    # an image without WORKDIR runs where ember's commands run (the user's home)
    assert exec_defaults({"oci": {"working_dir": "", "user": ""}}).cwd is None


def test_users_as_images_name_them() -> None:
    assert parse_user("1000") == 1000 and parse_user("1000:1000") == 1000
    assert parse_user("app:staff") == "app" and parse_user("") is None
    assert parse_user("bad name") is None and parse_user(5) is None
    assert parse_user("9" * 11) is None  # no uid that large


def test_malformed_metadata_is_ignored_not_trusted() -> None:
    d = exec_defaults({"oci": {"env": ["NOEQ", "1X=y", "A=\0", 3, "OK=1"] + ["B=x"] * 2000,
                               "working_dir": "relative", "user": ["root"],
                               "entrypoint": "sh", "cmd": ["ok", 1, "nul\0"]}})
    assert d.env == {"OK": "1", "B": "x"} and d.cwd is None and d.user is None
    assert d.command == ("ok",)
    assert image_command({"entrypoint": ["a"], "cmd": ["b"]}) == ("a", "b")


@given(st.dictionaries(st.sampled_from(["env", "working_dir", "user", "cmd", "entrypoint"]),
                       st.one_of(st.none(), st.text(max_size=50), st.integers(),
                                 st.lists(st.one_of(st.text(max_size=30), st.integers()),
                                          max_size=20))))
def test_any_config_gives_defaults_the_agent_accepts(oci: dict[str, object]) -> None:
    d = exec_defaults({"oci": oci})
    assert all(isinstance(k, str) and "=" not in k and isinstance(v, str) and "\0" not in v
               for k, v in d.env.items())
    assert d.cwd is None or d.cwd.startswith("/")
    assert d.user is None or isinstance(d.user, int | str)
