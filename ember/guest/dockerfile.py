"""Dockerfiles: parse (with ``dockerfile-parse``), validate and plan, with no I/O.

:func:`parse` turns a Dockerfile's text into :class:`Stage` objects whose instructions are
typed and checked: anything ember cannot build is refused here, with its line number and
the reason, before a VM starts. :func:`plan` then walks the chosen stage with the build's
ARG values and yields :class:`Step` objects in order: ``kind`` says whether the step
changes the file system (``run``, ``copy``) or only the image's metadata (``meta``);
every value is already expanded (``$VAR``, ``${VAR}``, ``${VAR:-word}``, ``${VAR:+word}``
in the instructions Docker expands). :func:`step_key` is the step cache's key.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter

from ember.errors import DockerfileError

MAX_DOCKERFILE_BYTES = 1 << 20
MAX_INSTRUCTIONS = 1000
#: Bump when what a step does for the same key changes (invalidates the step cache).
STEP_RECIPE = "ember-dockerfile-step-v1"

SUPPORTED = ("FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "LABEL",
             "EXPOSE", "CMD", "ENTRYPOINT", "SHELL")
#: Refused instructions and why (the rest of Docker's are refused as unknown).
REFUSED = {
    "VOLUME": "volumes are not part of an ember template (use the files API or a disk)",
    "HEALTHCHECK": "ember templates carry no health check",
    "ONBUILD": "ONBUILD triggers are not supported",
    "STOPSIGNAL": "ember sandboxes are stopped by their VM, not by a signal",
    "MAINTAINER": "MAINTAINER is deprecated: use LABEL maintainer=...",
}
DEFAULT_SHELL = ("/bin/sh", "-c")
_RUN_FLAGS = re.compile(r"^--(mount|network|security)(=|\s)")
_COPY_FLAGS = {"from", "chown", "chmod"}
_ADD_FLAGS = {"chown", "chmod"}
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def dockerfile_error(line: int, message: str) -> DockerfileError:
    """A :class:`DockerfileError` naming ``line`` (1-based; 0: the whole file)."""
    err = DockerfileError(f"Dockerfile line {line}: {message}" if line else
                          f"Dockerfile: {message}")
    err.line = line
    return err


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based
    name: str  # upper case
    value: str  # the text after the instruction name (continuations joined)
    text: str  # the original lines, for messages


@dataclass(frozen=True)
class Stage:
    index: int
    base: str  # as written (ARG references unexpanded)
    alias: str | None
    line: int
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class CopySpec:
    sources: tuple[str, ...]  # relative to the context (or the stage named by ``from_stage``)
    dest: str  # absolute, in the guest
    chown: str | None = None
    chmod: int | None = None
    from_stage: str | None = None
    add: bool = False  # ADD: local tar archives are unpacked at the destination


@dataclass(frozen=True)
class State:
    """What the metadata instructions built up so far (they create no layer)."""

    env: tuple[tuple[str, str], ...] = ()
    args: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    user: str = ""
    shell: tuple[str, ...] = DEFAULT_SHELL
    labels: tuple[tuple[str, str], ...] = ()
    exposed: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    #: Whether a WORKDIR (here or in the base image) named ``workdir``: if not, the
    #: template names none and its commands run where ember's do (the user's home).
    workdir_set: bool = False
    #: Whether this stage set CMD (an ENTRYPOINT then keeps it, as Docker does).
    cmd_set: bool = False

    @classmethod
    def from_image(cls, oci: Mapping[str, Any] | None) -> State:
        """The state a stage starts in: its base template's image metadata (``config
        ["oci"]``: ENV, WORKDIR, USER, CMD, ENTRYPOINT, EXPOSE, LABEL are inherited, as
        from a Docker base image). Malformed values are ignored."""
        if not isinstance(oci, Mapping):
            return cls()

        def strings(key: str) -> tuple[str, ...]:
            v = oci.get(key)
            return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()

        env = tuple((k, v) for k, eq, v in (e.partition("=") for e in strings("env"))
                    if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
        wd = oci.get("working_dir")
        workdir = _normpath(wd) if isinstance(wd, str) and wd.startswith("/") else ""
        user = oci.get("user")
        labels = oci.get("labels")
        return cls(env=env, workdir=workdir or "/", workdir_set=bool(workdir),
                   user=user if isinstance(user, str) else "",
                   cmd=strings("cmd"), entrypoint=strings("entrypoint"),
                   exposed=strings("exposed_ports"),
                   labels=tuple((k, v) for k, v in labels.items() if isinstance(k, str)
                                and isinstance(v, str)) if isinstance(labels, dict) else ())

    def vars(self) -> dict[str, str]:
        """What ``$VAR`` expands to: ENV wins over ARG."""
        return {**dict(self.args), **dict(self.env)}

    def config(self) -> dict[str, Any]:
        """The template's metadata, in the shape of an OCI image's (``config["oci"]``)."""
        return {"env": [f"{k}={v}" for k, v in self.env],
                "working_dir": self.workdir if self.workdir_set else "",
                "user": self.user, "cmd": list(self.cmd), "entrypoint": list(self.entrypoint),
                "exposed_ports": list(self.exposed), "labels": dict(self.labels)}


@dataclass(frozen=True)
class Step:
    kind: str  # "run" | "copy" | "meta"
    instruction: Instruction
    state: State  # the state after this instruction
    argv: tuple[str, ...] = ()  # run: the command
    copy: CopySpec | None = None
    #: What identifies the step for the cache (the instruction after expansion).
    expanded: str = ""


@dataclass(frozen=True)
class Plan:
    base: str  # the FROM of the built stage, expanded
    stage: Stage
    steps: tuple[Step, ...]
    #: Stages the built one copies from (COPY --from), by alias or index, planned too.
    deps: Mapping[str, Plan] = field(default_factory=dict)
    start: State = field(default_factory=State)  # the base image's metadata

    @property
    def final(self) -> State:
        return self.steps[-1].state if self.steps else self.start


# --- parsing --------------------------------------------------------------------------
def parse(text: str) -> tuple[tuple[tuple[str, str | None], ...], tuple[Stage, ...]]:
    """Parse a Dockerfile: (ARGs before the first FROM, stages). Raises DockerfileError."""
    if len(text.encode()) > MAX_DOCKERFILE_BYTES:
        raise dockerfile_error(0, f"larger than {MAX_DOCKERFILE_BYTES >> 10} KiB")
    if not text.strip():
        raise dockerfile_error(0, "empty (a Dockerfile needs at least a FROM)")
    if re.search(r"<<-?\s*['\"]?[A-Za-z_]", text) and re.search(
            r"^\s*(RUN|COPY|ADD)\b[^\n]*<<", text, re.M | re.I):
        line = next(i for i, s in enumerate(text.splitlines(), 1)
                    if re.match(r"^\s*(RUN|COPY|ADD)\b[^\n]*<<", s, re.I))
        raise dockerfile_error(line, "heredocs (<<EOF) are not supported")
    if not text.endswith("\n"):
        text += "\n"  # the parser drops a last line without one
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()), env_replace=False)
    structure = parser.structure
    _check_coverage(text, structure)
    items = [i for i in structure if i["instruction"] != "COMMENT"]
    if len(items) > MAX_INSTRUCTIONS:
        raise dockerfile_error(0, f"more than {MAX_INSTRUCTIONS} instructions")
    global_args: list[tuple[str, str | None]] = []
    stages: list[Stage] = []
    current: list[Instruction] = []
    head: tuple[str, str | None, int] | None = None
    for item in items:
        ins = Instruction(line=int(item["startline"]) + 1, name=str(item["instruction"]).upper(),
                          value=str(item["value"]).strip(), text=str(item["content"]).strip())
        _check(ins)
        if ins.name == "FROM":
            if head is not None:
                stages.append(Stage(len(stages), head[0], head[1], head[2], tuple(current)))
            base, alias = _parse_from(ins)
            if alias is not None and any(s.alias == alias for s in stages):
                raise dockerfile_error(ins.line, f"stage name {alias!r} is used twice")
            head, current = (base, alias, ins.line), []
        elif head is None:
            if ins.name != "ARG":
                raise dockerfile_error(ins.line, f"{ins.name} before the first FROM (only ARG "
                                                "may come before it)")
            global_args.extend(_parse_arg(ins))
        else:
            current.append(ins)
    if head is None:
        raise dockerfile_error(0, "no FROM instruction")
    stages.append(Stage(len(stages), head[0], head[1], head[2], tuple(current)))
    return tuple(global_args), tuple(stages)


def _check_coverage(text: str, structure: list[dict[str, Any]]) -> None:
    """Every line that is not blank or a comment belongs to an instruction the parser
    returned (it drops what it cannot read, such as a continuation at the end)."""
    covered: set[int] = set()
    for item in structure:
        covered.update(range(int(item["startline"]), int(item["endline"]) + 1))
    for n, line in enumerate(text.splitlines()):
        s = line.strip()
        if s and not s.startswith("#") and n not in covered:
            if text.rstrip().endswith("\\"):
                raise dockerfile_error(n + 1, "the file ends inside an instruction (a line "
                                              "continuation \\ at the end)")
            raise dockerfile_error(n + 1, f"cannot parse {s[:80]!r}")


def _check(ins: Instruction) -> None:
    if ins.name in REFUSED:
        raise dockerfile_error(ins.line, f"{ins.name} is not supported: {REFUSED[ins.name]}")
    if ins.name not in SUPPORTED:
        raise dockerfile_error(ins.line, f"unknown instruction {ins.name!r}")
    if not ins.value:
        raise dockerfile_error(ins.line, f"{ins.name} needs arguments")


def _parse_from(ins: Instruction) -> tuple[str, str | None]:
    words = ins.value.split()
    if words and words[0].startswith("--"):
        raise dockerfile_error(ins.line, f"FROM option {words[0]} is not supported")
    if len(words) == 1:
        return words[0], None
    if len(words) == 3 and words[1].lower() == "as":
        alias = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9._-]{0,62}", alias):
            raise dockerfile_error(ins.line, f"invalid stage name {words[2]!r}")
        return words[0], alias
    raise dockerfile_error(ins.line, "FROM takes IMAGE [AS NAME]")


def _parse_arg(ins: Instruction) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for word in _words(ins, ins.value):
        name, eq, default = word.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise dockerfile_error(ins.line, f"invalid ARG name {name!r}")
        out.append((name, default if eq else None))
    return out


def _words(ins: Instruction, value: str) -> list[str]:
    """Shell-like words with quotes removed (dockerfile-parse's splitter)."""
    try:
        return [w for w in WordSplitter(value).split() if w is not None]
    except ValueError as err:
        raise dockerfile_error(ins.line, f"cannot split {value!r}: {err}") from err


def expand(value: str, variables: Mapping[str, str], line: int = 0) -> str:
    """Docker's variable substitution: ``$V``, ``${V}``, ``${V:-word}``, ``${V:+word}``;
    ``\\$`` is a literal dollar; nothing is expanded inside single quotes."""
    out: list[str] = []
    i, quoted = 0, False
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value) and value[i + 1] == "$" and not quoted:
            out.append("\\$")  # the splitter removes the backslash
            i += 2
            continue
        if c == "'":
            quoted = not quoted
        if c == "$" and not quoted:
            m = _VAR.match(value, i)
            if m is None:
                if value.startswith("${", i):
                    raise dockerfile_error(line, f"bad substitution in {value!r}")
                out.append(c)
                i += 1
                continue
            name = m.group(1) or m.group(4)
            have = variables.get(name)
            if m.group(2) == "-":
                out.append(have if have else m.group(3))
            elif m.group(2) == "+":
                out.append(m.group(3) if have else "")
            else:
                out.append(have or "")
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _json_list(ins: Instruction, value: str) -> tuple[str, ...] | None:
    """The exec (JSON) form, or None for the shell form."""
    if not value.startswith("["):
        return None
    try:
        got = json.loads(value)
    except ValueError:
        return None  # Docker runs it through the shell then
    if not isinstance(got, list) or not all(isinstance(w, str) for w in got):
        raise dockerfile_error(ins.line, f"{ins.name} JSON form must be a list of strings")
    return tuple(got)


def _flags(ins: Instruction, words: list[str], allowed: set[str]) -> tuple[dict[str, str],
                                                                          list[str]]:
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        name, eq, val = words.pop(0)[2:].partition("=")
        if name not in allowed:
            raise dockerfile_error(ins.line, f"{ins.name} option --{name} is not supported")
        if not eq or not val:
            raise dockerfile_error(ins.line, f"{ins.name} --{name} needs a value (--{name}=...)")
        flags[name] = val
    return flags, words


# --- planning -------------------------------------------------------------------------
def select(stages: Sequence[Stage], target: str | None) -> Stage:
    if target is None:
        return stages[-1]
    for s in stages:
        if s.alias == target.lower() or str(s.index) == target:
            return s
    raise dockerfile_error(0, f"no stage named {target!r} (--target)")


def plan(text: str, build_args: Mapping[str, str], target: str | None = None,
         bases: Mapping[str, Mapping[str, Any]] | None = None) -> Plan:
    """Parse and plan the build of stage ``target`` (default: the last). ``bases``: the
    image metadata (``config["oci"]``) of the FROM templates, by the FROM as expanded
    (a stage starts from its base's metadata; without it, from none)."""
    global_args, stages = parse(text)
    declared = {n for n, _ in global_args} | {
        n for s in stages for i in s.instructions if i.name == "ARG" for n, _ in _parse_arg(i)}
    unknown = sorted(set(build_args) - declared)
    if unknown:
        raise dockerfile_error(0, f"--build-arg {', '.join(unknown)}: not declared by any ARG")
    return _plan_stage(stages, select(stages, target), global_args, build_args, set(),
                       bases or {})


def bases_of(p: Plan) -> list[tuple[str, int]]:
    """Every FROM a plan starts from that is not a stage (its own and its COPY --from
    stages'), with the line of that FROM."""
    out = [(p.base, p.stage.line)]
    for dep in p.deps.values():
        out.extend(b for b in bases_of(dep) if b not in out)
    return out


def _plan_stage(stages: Sequence[Stage], stage: Stage,
                global_args: Sequence[tuple[str, str | None]], build_args: Mapping[str, str],
                seen: set[int], bases: Mapping[str, Mapping[str, Any]]) -> Plan:
    if stage.index in seen:
        raise dockerfile_error(stage.line, "stages copy from each other in a cycle")
    seen = seen | {stage.index}
    meta = {n: build_args.get(n, d or "") for n, d in global_args}
    base = expand(stage.base, meta, stage.line)
    if not base:
        raise dockerfile_error(stage.line, f"FROM {stage.base!r} expands to nothing")
    deps: dict[str, Plan] = {}
    parent = next((s for s in stages if s.alias == base.lower() and s.index < stage.index),
                  None)
    if parent is not None:  # FROM an earlier stage: go on from its plan
        prior = _plan_stage(stages, parent, global_args, build_args, seen, bases)
        state = replace(prior.final, args=(), cmd_set=False)
        steps: list[Step] = list(prior.steps)
        base, deps, start = prior.base, dict(prior.deps), prior.start
    else:
        state, steps = State.from_image(bases.get(base)), []
        start = state
    for ins in stage.instructions:
        step = _step(ins, state, global_args, build_args)
        if step.copy is not None and step.copy.from_stage is not None:
            src = step.copy.from_stage
            dep = next((s for s in stages if s.alias == src.lower() or str(s.index) == src),
                       None)
            if dep is None or dep.index >= stage.index:
                raise dockerfile_error(ins.line, f"COPY --from={src}: no earlier stage of that "
                                                "name (images are not supported as --from)")
            deps[str(dep.index)] = _plan_stage(stages, dep, global_args, build_args, seen,
                                               bases)
            step = replace(step, copy=replace(step.copy, from_stage=str(dep.index)))
        steps.append(step)
        state = step.state
    return Plan(base=base, stage=stage, steps=tuple(steps), deps=deps, start=start)


def _step(ins: Instruction, st: State, global_args: Sequence[tuple[str, str | None]],
          build_args: Mapping[str, str]) -> Step:
    v = st.vars()
    n = ins.name
    if n == "ARG":
        args = dict(st.args)
        defaults = dict(global_args)
        for name, default in _parse_arg(ins):
            if name in build_args:
                args[name] = build_args[name]
            elif default is not None:
                args[name] = expand(default, v, ins.line)
            else:
                args[name] = defaults.get(name) or ""
        new = replace(st, args=tuple(args.items()))
        return Step("meta", ins, new, expanded=f"ARG {json.dumps(sorted(args.items()))}")
    if n in ("ENV", "LABEL"):
        pairs = _key_values(ins, expand(ins.value, v, ins.line))
        if n == "ENV":
            env = dict(st.env)
            env.update(pairs)
            new = replace(st, env=tuple(env.items()))
        else:
            labels = dict(st.labels)
            labels.update(pairs)
            new = replace(st, labels=tuple(labels.items()))
        return Step("meta", ins, new, expanded=f"{n} {json.dumps(pairs)}")
    if n == "WORKDIR":
        words = _words(ins, expand(ins.value, v, ins.line))
        if len(words) != 1:
            raise dockerfile_error(ins.line, "WORKDIR takes one path")
        path = words[0] if words[0].startswith("/") else f"{st.workdir.rstrip('/')}/{words[0]}"
        path = _normpath(path)
        new = replace(st, workdir=path, workdir_set=True)
        return Step("run", ins, new, argv=("mkdir", "-p", path), expanded=f"WORKDIR {path}")
    if n == "USER":
        user = expand(ins.value, v, ins.line).strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}(:[A-Za-z0-9_.-]{1,32})?", user):
            raise dockerfile_error(ins.line, f"invalid USER {user!r}")
        return Step("meta", ins, replace(st, user=user), expanded=f"USER {user}")
    if n == "EXPOSE":
        ports = []
        for w in _words(ins, expand(ins.value, v, ins.line)):
            if not re.fullmatch(r"\d{1,5}(-\d{1,5})?(/(tcp|udp|sctp))?", w):
                raise dockerfile_error(ins.line, f"invalid port {w!r}")
            ports.append(w if "/" in w else f"{w}/tcp")
        new = replace(st, exposed=tuple(dict.fromkeys((*st.exposed, *ports))))
        return Step("meta", ins, new, expanded=f"EXPOSE {' '.join(ports)}")
    if n in ("CMD", "ENTRYPOINT", "SHELL"):
        exec_form = _json_list(ins, ins.value)
        if n == "SHELL":
            if exec_form is None or not exec_form:
                raise dockerfile_error(ins.line, "SHELL must be a non-empty JSON list")
            return Step("meta", ins, replace(st, shell=exec_form),
                        expanded=f"SHELL {json.dumps(exec_form)}")
        form: tuple[str, ...] = exec_form if exec_form is not None else (*st.shell, ins.value)
        # an ENTRYPOINT resets a CMD the base image gave, not one this stage set
        new = replace(st, cmd=form, cmd_set=True) if n == "CMD" else \
            replace(st, entrypoint=form, cmd=st.cmd if st.cmd_set else ())
        return Step("meta", ins, new, expanded=f"{n} {json.dumps(form)}")
    if n == "RUN":
        if _RUN_FLAGS.match(ins.value):
            raise dockerfile_error(ins.line, "RUN options (--mount, --network, --security) are "
                                            "not supported")
        exec_form = _json_list(ins, ins.value)
        argv = exec_form if exec_form is not None else (*st.shell, ins.value)
        if not argv:
            raise dockerfile_error(ins.line, "RUN with an empty command")
        return Step("run", ins, st, argv=argv, expanded=f"RUN {json.dumps(argv)}")
    if n in ("COPY", "ADD"):
        return _copy_step(ins, st)
    raise dockerfile_error(ins.line, f"unhandled instruction {n}")  # pragma: no cover


def _copy_step(ins: Instruction, st: State) -> Step:
    v = st.vars()
    exec_form = _json_list(ins, ins.value)
    if exec_form is not None:
        words = [expand(w, v, ins.line) for w in exec_form]
    else:
        words = _words(ins, expand(ins.value, v, ins.line))
    flags, words = _flags(ins, words, _COPY_FLAGS if ins.name == "COPY" else _ADD_FLAGS)
    if len(words) < 2:
        raise dockerfile_error(ins.line, f"{ins.name} needs a source and a destination")
    *sources, dest = words
    for s in sources:
        if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.I) or s.startswith("git@"):
            raise dockerfile_error(ins.line, f"{ins.name} of a URL ({s}) is not supported: "
                                            "fetch it in a RUN step (with --network)")
        if "from" not in flags:
            if s.startswith("/"):
                raise dockerfile_error(ins.line, f"{ins.name} source {s!r} is absolute: sources "
                                                "are relative to the build context")
            if ".." in s.split("/"):
                raise dockerfile_error(ins.line, f"{ins.name} source {s!r} leaves the build "
                                                "context")
    chmod = None
    if "chmod" in flags:
        if not re.fullmatch(r"[0-7]{3,4}", flags["chmod"]):
            raise dockerfile_error(ins.line, f"--chmod={flags['chmod']}: only octal modes")
        chmod = int(flags["chmod"], 8)
    chown = flags.get("chown")
    if chown is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}(:[A-Za-z0-9_.-]{1,32})?",
                                              chown):
        raise dockerfile_error(ins.line, f"invalid --chown={chown}")
    target = dest if dest.startswith("/") else f"{st.workdir.rstrip('/')}/{dest}"
    if dest.endswith("/") or dest in (".", "./"):
        target = target.rstrip("/.") + "/"
    if len(sources) > 1 and not target.endswith("/"):
        raise dockerfile_error(ins.line, f"{ins.name} of several sources needs a directory "
                                        "destination ending in /")
    spec = CopySpec(tuple(sources), target, chown=chown, chmod=chmod,
                    from_stage=flags.get("from"), add=ins.name == "ADD")
    text = json.dumps({"src": sources, "dest": target, "chown": chown, "chmod": chmod,
                       "from": flags.get("from"), "add": spec.add})
    return Step("copy", ins, st, copy=spec, expanded=f"{ins.name} {text}")


def _key_values(ins: Instruction, value: str) -> dict[str, str]:
    words = _words(ins, value)
    if words and "=" not in words[0]:  # the legacy form: ENV KEY the value
        if len(words) < 2:
            raise dockerfile_error(ins.line, f"{ins.name} {words[0]} needs a value")
        return {words[0]: value.split(None, 1)[1].strip()}
    out = {}
    for w in words:
        k, eq, val = w.partition("=")
        if not eq or not k:
            raise dockerfile_error(ins.line, f"{ins.name} expects KEY=VALUE, not {w!r}")
        if ins.name == "ENV" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise dockerfile_error(ins.line, f"invalid variable name {k!r}")
        out[k] = val
    return out


def _normpath(path: str) -> str:
    parts: list[str] = []
    for p in path.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return "/" + "/".join(parts)


# --- FROM an image reference ----------------------------------------------------------
def image_source(base: str, default_registry: str | None = None) -> str | None:
    """The ``registry:`` source a FROM that names no template means, read the way Docker
    reads an image reference: ``python:3.11-slim`` is
    ``registry:registry-1.docker.io/library/python:3.11-slim``, ``user/repo`` is
    ``docker.io/user/repo:latest``, ``ghcr.io/o/r@sha256:...`` is that registry's.
    ``default_registry`` (``HOST[:PORT]``, ``EMBER_DEFAULT_REGISTRY``) stands in for
    Docker Hub (a mirror, or the registry of an air-gapped site). None: not a reference."""
    from ember.errors import ImageSourceError
    from ember.guest.oci.reference import DOCKER_HUB, parse_registry_ref

    try:
        ref = parse_registry_ref(base)
        host = ref.host
        if host == DOCKER_HUB and default_registry:
            host = parse_registry_ref(f"{default_registry.strip()}/x").host
            if host == DOCKER_HUB and default_registry.strip() not in (
                    "docker.io", "index.docker.io", DOCKER_HUB):
                raise ImageSourceError(f"bad default registry {default_registry!r}")
    except ImageSourceError:
        return None
    text = f"registry:{host}/{ref.repository}"
    if ref.tag:
        text += f":{ref.tag}"
    if ref.digest:
        text += f"@{ref.digest}"
    return text


# --- cache keys ------------------------------------------------------------------------
def base_key(base: str, base_digest: str, base_snapshot: str, shape: Mapping[str, Any]) -> str:
    """The key of the state a build starts from: its base template and the build VM."""
    return _hash({"recipe": STEP_RECIPE, "from": base, "digest": base_digest,
                  "snapshot": base_snapshot, "shape": dict(shape)})


def step_key(parent: str, step: Step, content: str = "") -> str:
    """The cache key of a step that changes the file system: its parent's key, the
    instruction after expansion, what it runs with (env, user, workdir) and the digest of
    what it copies."""
    st = step.state
    return _hash({"parent": parent, "step": step.expanded, "env": sorted(st.vars().items()),
                  "user": st.user, "workdir": st.workdir, "content": content})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def iter_fs_steps(p: Plan) -> Iterator[Step]:
    return (s for s in p.steps if s.kind != "meta")
