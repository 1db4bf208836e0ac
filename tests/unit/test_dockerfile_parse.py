"""Dockerfiles: parsing, refusals with their line, expansion, planning and cache keys."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import BadRequestError, DockerfileError
from ember.guest import dockerfile as df

EVERYTHING = """\
# every supported instruction
ARG BASE=debian-python
FROM $BASE AS app
ARG GREETING=hello
ARG EMPTY
ENV APP_HOME=/app NAME="ember user"
ENV LEGACY the legacy form
LABEL org.example.name="demo app" version=1
WORKDIR $APP_HOME
WORKDIR sub
COPY --chown=nobody:nogroup --chmod=640 a*.txt ./
ADD data/ /data/
SHELL ["/bin/bash", "-c"]
RUN echo "$GREETING" \\
    && echo done
RUN ["python3", "-c", "print(1)"]
USER nobody
EXPOSE 8000 53/udp
ENTRYPOINT ["python3"]
CMD ["-m", "http.server"]
"""


def test_every_supported_instruction_is_planned() -> None:
    p = df.plan(EVERYTHING, {"GREETING": "hi"})
    assert p.base == "debian-python"
    kinds = [(s.instruction.line, s.instruction.name, s.kind) for s in p.steps]
    assert kinds[0] == (4, "ARG", "meta")
    assert ("WORKDIR", "run") in [(n, k) for _, n, k in kinds]
    run_shell = next(s for s in p.steps if s.instruction.line == 14)
    assert run_shell.argv[:2] == ("/bin/bash", "-c")  # SHELL applies to the RUN after it
    assert "echo done" in run_shell.argv[2]
    run_exec = next(s for s in p.steps if s.instruction.line == 16)
    assert run_exec.argv == ("python3", "-c", "print(1)")
    copy = next(s for s in p.steps if s.instruction.name == "COPY")
    assert copy.copy is not None
    assert copy.copy.dest == "/app/sub/"
    assert copy.copy.chown == "nobody:nogroup" and copy.copy.chmod == 0o640
    cfg = p.final.config()
    assert cfg["working_dir"] == "/app/sub"
    assert "NAME=ember user" in cfg["env"] and "LEGACY=the legacy form" in cfg["env"]
    assert cfg["user"] == "nobody"
    assert cfg["exposed_ports"] == ["8000/tcp", "53/udp"]
    assert cfg["entrypoint"] == ["python3"] and cfg["cmd"] == ["-m", "http.server"]
    assert cfg["labels"] == {"org.example.name": "demo app", "version": "1"}
    assert dict(run_shell.state.vars())["GREETING"] == "hi"  # the --build-arg wins


@pytest.mark.parametrize(("text", "line", "words"), [
    ("", 0, "empty"),
    ("RUN true", 1, "before the first FROM"),
    ("FROM a\nFOO bar", 2, "unknown instruction"),
    ("FROM a\nVOLUME /x", 2, "VOLUME is not supported"),
    ("FROM a\nHEALTHCHECK NONE", 2, "HEALTHCHECK"),
    ("FROM a\nONBUILD RUN x", 2, "ONBUILD"),
    ("FROM a\n\nRUN", 3, "needs arguments"),
    ("FROM a\nRUN echo \\", 2, "ends inside an instruction"),
    ("FROM a\nCOPY ../x /y", 2, "leaves the build context"),
    ("FROM a\nCOPY ok/../../x /y", 2, "leaves the build context"),
    ("FROM a\nCOPY /etc/passwd /y", 2, "absolute"),
    ("FROM a\nADD https://example.com/x /y", 2, "URL"),
    ("FROM a\nCOPY --link a /b", 2, "--link is not supported"),
    ("FROM a\nCOPY --chmod=u+x a /b", 2, "octal"),
    ("FROM a\nCOPY a b /c", 2, "directory destination"),
    ("FROM a\nCOPY a", 2, "source and a destination"),
    ("FROM a\nRUN --mount=type=cache,target=/x true", 2, "not supported"),
    ("FROM a\nRUN <<EOF\necho\nEOF", 2, "heredocs"),
    ("FROM a\nSHELL /bin/sh", 2, "JSON list"),
    ("FROM a\nEXPOSE http", 2, "invalid port"),
    ("FROM a\nUSER a b", 2, "invalid USER"),
    ("FROM a\nENV 1X=2", 2, "invalid variable name"),
    ("FROM a AS s\nCOPY --from=later /x /y\nFROM b AS later\nCOPY --from=s /x /y", 2,
     "no earlier stage"),
    ("FROM a AS x\nFROM b AS x", 2, "used twice"),
    ("FROM --platform=linux/amd64 a", 1, "--platform"),
    ("FROM a\nRUN echo ${", 0, ""),  # the shell's business, not ours: accepted
])
def test_refusals_name_the_line(text: str, line: int, words: str) -> None:
    if not words:
        df.plan(text, {})
        return
    with pytest.raises(DockerfileError) as got:
        df.plan(text, {})
    assert got.value.line == line
    assert words in str(got.value)
    if line:
        assert str(got.value).startswith(f"Dockerfile line {line}:")


def test_it_is_a_bad_request_with_its_own_code() -> None:
    err = df.dockerfile_error(3, "x")
    assert isinstance(err, BadRequestError) and err.code == "dockerfile_invalid"


def test_an_undeclared_build_arg_is_refused() -> None:
    with pytest.raises(DockerfileError, match="NOPE"):
        df.plan("FROM a\nRUN true", {"NOPE": "1"})


@pytest.mark.parametrize(("value", "want"), [
    ("$A", "1"), ("${A}x", "1x"), ("${MISSING:-dflt}", "dflt"), ("${A:-dflt}", "1"),
    ("${A:+set}", "set"), ("${MISSING:+set}", ""), ("'$A'", "'$A'"), ("\\$A", "\\$A"),
    ("$MISSING.", "."), ("a$", "a$"),
])
def test_expansion(value: str, want: str) -> None:
    assert df.expand(value, {"A": "1"}) == want


def test_a_bad_substitution_is_refused() -> None:
    with pytest.raises(DockerfileError, match="bad substitution"):
        df.plan("FROM a\nWORKDIR ${A", {})


def test_global_args_expand_from_and_need_redeclaring_inside() -> None:
    text = "ARG V=1\nARG IMG=base\nFROM ${IMG}-${V}\nARG V\nRUN echo $V"
    p = df.plan(text, {"V": "2"})
    assert p.base == "base-2"
    assert dict(p.steps[-1].state.vars())["V"] == "2"
    p = df.plan(text, {})
    assert dict(p.steps[-1].state.vars())["V"] == "1"  # the global default


def test_env_is_expanded_in_later_instructions_and_workdir_is_relative() -> None:
    p = df.plan("FROM a\nENV D=/srv\nWORKDIR $D/app\nWORKDIR ../x\nCOPY f .", {})
    copy = p.steps[-1].copy
    assert copy is not None
    assert p.final.workdir == "/srv/x" and copy.dest == "/srv/x/"


def test_multi_stage_and_target() -> None:
    text = ("FROM debian-python AS build\nRUN echo one > /one\n"
            "FROM debian-python AS final\nCOPY --from=build /one /copied\nRUN true\n"
            "FROM final AS extra\nRUN echo extra")
    p = df.plan(text, {})
    assert p.stage.alias == "extra"
    assert [s.instruction.line for s in p.steps] == [4, 5, 7]  # extra goes on from final
    assert set(p.deps) == {"0"}
    p = df.plan(text, {}, target="build")
    assert [s.instruction.line for s in p.steps] == [2] and not p.deps
    with pytest.raises(DockerfileError, match="no stage named"):
        df.plan(text, {}, target="nope")


def test_cache_keys_change_with_what_matters_only() -> None:
    base = df.base_key("debian-python", "sha256:aa", "", {})
    p1 = df.plan("FROM a\nARG X=1\nRUN echo $X", {})
    p2 = df.plan("FROM a\nARG X=1\nRUN echo $X", {"X": "2"})
    p3 = df.plan("FROM a\n# a comment\nARG X=1\n\nRUN echo $X", {})
    k1, k2, k3 = (df.step_key(base, p.steps[-1]) for p in (p1, p2, p3))
    assert k1 != k2  # the ARG's value reaches the RUN
    assert k1 == k3  # comments and blank lines are not steps
    assert df.step_key(base, p1.steps[-1], "digest-a") != df.step_key(base, p1.steps[-1],
                                                                       "digest-b")
    assert df.step_key(df.base_key("other", "sha256:aa", "", {}), p1.steps[-1]) != k1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_hostile_text_gives_a_plan_or_a_dockerfile_error(text: str) -> None:
    with contextlib.suppress(DockerfileError):
        df.plan(text, {})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["FROM a", "RUN x", "COPY a b", "ENV A=1", "ARG B",
                                 "WORKDIR /w", "USER u", "CMD [\"x\"]", "EXPOSE 1",
                                 "LABEL a=b", "SHELL [\"sh\",\"-c\"]", "ADD a /b/",
                                 "ENTRYPOINT x", "FROM a AS s", "COPY --from=s /a /b",
                                 "VOLUME /v", "\\", "RUN [\"broken\"", "${"]), max_size=12))
def test_instruction_soup_gives_a_plan_or_a_dockerfile_error(lines: list[str]) -> None:
    with contextlib.suppress(DockerfileError):
        df.plan("\n".join(lines), {})


PYTHON_IMAGE = {"env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                "working_dir": "/srv", "user": "app:app", "cmd": ["python3"],
                "entrypoint": [], "exposed_ports": ["9000/tcp"], "labels": {"from": "base"}}


def test_a_stage_starts_from_its_base_images_metadata() -> None:
    text = ("FROM python:3.11-slim\nENV PATH=/opt/venv/bin:$PATH\nWORKDIR app\n"
            "RUN pip list\nEXPOSE 8000\nLABEL mine=1\n")
    p = df.plan(text, {}, bases={"python:3.11-slim": PYTHON_IMAGE})
    run = next(s for s in p.steps if s.kind == "run" and s.instruction.name == "RUN")
    assert run.state.vars()["PATH"] == "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"
    assert run.state.workdir == "/srv/app" and run.state.user == "app:app"
    cfg = p.final.config()
    assert cfg["env"] == ["PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"]
    assert cfg["working_dir"] == "/srv/app" and cfg["user"] == "app:app"
    assert cfg["cmd"] == ["python3"]  # inherited
    assert cfg["exposed_ports"] == ["9000/tcp", "8000/tcp"]
    assert cfg["labels"] == {"from": "base", "mine": "1"}
    # without the base's metadata (before the base is known): none of it
    assert df.plan(text, {}).final.config()["user"] == ""
    # a stage that only names its base gives that base's metadata
    assert df.plan("FROM python:3.11-slim", {},
                   bases={"python:3.11-slim": PYTHON_IMAGE}).final.config()["cmd"] == [
        "python3"]


def test_entrypoint_resets_the_base_images_cmd_but_not_this_stages() -> None:
    bases = {"b": PYTHON_IMAGE}
    cfg = df.plan("FROM b\nENTRYPOINT [\"tini\"]\n", {}, bases=bases).final.config()
    assert cfg["entrypoint"] == ["tini"] and cfg["cmd"] == []
    cfg = df.plan("FROM b\nCMD [\"x\"]\nENTRYPOINT [\"tini\"]\n", {}, bases=bases).final.config()
    assert cfg["entrypoint"] == ["tini"] and cfg["cmd"] == ["x"]


def test_no_workdir_names_none_and_malformed_base_metadata_is_ignored() -> None:
    assert df.plan("FROM a\nRUN true", {}).final.config()["working_dir"] == ""
    bad = {"env": ["NOEQUALS", "1BAD=x", "OK=1", 7], "working_dir": "relative",
           "user": 5, "cmd": "not a list", "labels": ["x"]}
    st = df.plan("FROM a\nRUN true", {}, bases={"a": bad}).final
    assert st.env == (("OK", "1"),) and st.workdir == "/" and st.user == "" and st.cmd == ()
    assert df.bases_of(df.plan("FROM x AS one\nRUN true\nFROM y\nCOPY --from=one /a /b\n",
                               {})) == [("y", 3), ("x", 1)]


@pytest.mark.parametrize(("base", "mirror", "want"), [
    ("python:3.11-slim", None, "registry:registry-1.docker.io/library/python:3.11-slim"),
    ("ubuntu", None, "registry:registry-1.docker.io/library/ubuntu:latest"),
    ("user/repo", None, "registry:registry-1.docker.io/user/repo:latest"),
    ("docker.io/library/alpine:3", None, "registry:registry-1.docker.io/library/alpine:3"),
    ("python@sha256:" + "b" * 64, None,
     "registry:registry-1.docker.io/library/python@sha256:" + "b" * 64),
    ("ghcr.io/org/r:1", None, "registry:ghcr.io/org/r:1"),
    ("localhost:5000/x", None, "registry:localhost:5000/x:latest"),
    # the default registry stands in for Docker Hub only
    ("python:3.11-slim", "127.0.0.1:5000", "registry:127.0.0.1:5000/library/python:3.11-slim"),
    ("user/repo", "mirror.example:443", "registry:mirror.example:443/user/repo:latest"),
    ("ghcr.io/org/r:1", "127.0.0.1:5000", "registry:ghcr.io/org/r:1"),
    ("Not A Ref", None, None),
    ("a/b:c:d", None, None),
    ("python", "not a host!", None),
])
def test_docker_image_references_resolve_as_docker_reads_them(base: str, mirror: str | None,
                                                              want: str | None) -> None:
    assert df.image_source(base, mirror) == want
