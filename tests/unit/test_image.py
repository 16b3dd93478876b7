"""The production image and the compose file, checked without Docker.

The build context is emulated: the repository's files that .dockerignore lets
in (Docker's rules, read here), laid out in a folder, and the wheel built from
it with pip and the setuptools deploy/build.lock pins, as the Dockerfile's
build stage does after `COPY . .`. On that: what the image holds, which console
scripts survive in it, and that every command the Dockerfile and the compose
file (and deploy/k8s) run is one of them. Beside it: the base image is pinned
by digest, hadolint passes, the locks agree with pyproject.toml, and the compose
file is valid with a healthcheck or a one-shot role for every service.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution, version
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from intentflow.consumer.settings import ConsumerSettings
from intentflow.producer.settings import BridgeSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
LOCK = ROOT / "deploy" / "requirements.lock"
BUILD_LOCK = ROOT / "deploy" / "build.lock"
TOOLS = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

PRODUCTION = ("consumer", "producer", "schemas")
KEPT_OUT = ("tests", "loadtest", "devservices", "stripekit", "docs", ".git", ".venv")
CONTEXT_TOP = {"pyproject.toml", "README.md", "LICENSE", "intentflow", "deploy", *PRODUCTION}


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.exists(), f"{name} is missing: pip install -e '.[test]'"
    return str(path)


# -- Docker's .dockerignore rules ---------------------------------------------


@dataclass(frozen=True)
class Rule:
    pattern: str
    regex: re.Pattern[str]
    keep: bool  # a `!` rule: lets back in what an earlier rule left out


def translate(pattern: str) -> str:
    """A .dockerignore pattern as a regular expression, as Docker's pattern matcher builds it."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        char = pattern[i]
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        elif char in "[]":
            out += char
        else:
            out += re.escape(char)
        i += 1
    return f"^{out}$"


def read_rules(text: str) -> list[Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append(Rule(pattern, re.compile(translate(pattern)), keep))
    return rules


def left_out(path: str, rules: list[Rule]) -> bool:
    """Whether Docker leaves `path` out: the last rule matching it or one of its folders decides."""
    parts = path.split("/")
    folders = ["/".join(parts[:n]) for n in range(1, len(parts))]
    out = False
    for rule in rules:
        if rule.keep != out:
            continue
        if rule.regex.match(path) or any(rule.regex.match(f) for f in folders):
            out = not rule.keep
    return out


def may_let_in_below(folder: str, rules: list[Rule]) -> bool:
    """Whether a `!` rule could let in something under a folder that is left out (else skip it)."""
    parts = folder.split("/")
    for rule in rules:
        segments = rule.pattern.split("/")
        if rule.keep and (
            "**" in rule.pattern
            or (
                len(segments) > len(parts)
                and all(re.match(translate(s), p) for s, p in zip(segments, parts, strict=False))
            )
        ):
            return True
    return False


def context_paths(root: Path, rules: list[Rule]) -> list[str]:
    """The files and links Docker sends as the build context of `root` (links are not followed)."""
    found = []
    for directory, folders, files in os.walk(root):
        rel = Path(directory).relative_to(root).as_posix()
        here = "" if rel == "." else f"{rel}/"
        walk = []
        for name in folders:
            path = here + name
            if Path(directory, name).is_symlink():
                if not left_out(path, rules):
                    found.append(path)
            elif not left_out(path, rules) or may_let_in_below(path, rules):
                walk.append(name)
        folders[:] = walk
        found += [here + name for name in files if not left_out(here + name, rules)]
    return sorted(found)


def lay_out(root: Path, paths: list[str], where: Path) -> None:
    for path in paths:
        source, target = root / path, where / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


def test_the_dockerignore_reader_follows_dockers_rules() -> None:
    rules = read_rules("# c\n*\n!a/b\n!/c\n**/__pycache__\n!c/keep/__pycache__\nd/**\n!d/x?\n")
    assert [left_out(p, rules) for p in ("a", "a/b", "a/b/x.py", "a/c", "c/y", "e")] == [
        True,
        False,
        False,
        True,
        False,
        True,
    ]
    assert left_out("a/b/__pycache__/x.pyc", rules)
    assert left_out("c/deep/__pycache__/x.pyc", rules)
    assert not left_out("c/keep/__pycache__/x.pyc", rules)
    assert left_out("d/xyz", rules) and not left_out("d/x1", rules)
    assert may_let_in_below("a", rules) and not may_let_in_below("e", rules)


# -- the context and the wheel built from it ----------------------------------


@dataclass(frozen=True)
class Context:
    root: Path
    paths: list[str]


@dataclass(frozen=True)
class Wheel:
    path: Path
    names: set[str]

    def holds(self, module: str) -> bool:
        path = module.replace(".", "/")
        return f"{path}.py" in self.names or f"{path}/__init__.py" in self.names


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Context:
    rules = read_rules((ROOT / ".dockerignore").read_text())
    paths = context_paths(ROOT, rules)
    where = tmp_path_factory.mktemp("context")
    lay_out(ROOT, paths, where)
    return Context(where, paths)


@pytest.fixture(scope="module")
def wheel(context: Context, tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    # pip builds in the source folder (egg-info, build/): a copy, so the context stays as sent.
    source = tmp_path_factory.mktemp("src") / "src"
    shutil.copytree(context.root, source, symlinks=True)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("--no-index", "--quiet", "--wheel-dir", str(out), str(source)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (path,) = out.glob("intentflow-*.whl")
    with zipfile.ZipFile(path) as archive:
        return Wheel(path, set(archive.namelist()))


def test_the_wheel_is_built_by_the_setuptools_the_image_uses() -> None:
    locked = read_lock(BUILD_LOCK)
    assert version("setuptools") == locked["setuptools"][0], (
        "the test extra's setuptools and deploy/build.lock's differ: pin the same in both"
    )


def test_the_context_holds_the_production_code_and_nothing_else(context: Context) -> None:
    leaked = [
        p
        for p in context.paths
        if p.split("/")[0] in KEPT_OUT or p.startswith(tuple(f"intentflow/{k}" for k in KEPT_OUT))
    ]
    assert not leaked, f".dockerignore lets in {leaked[:5]}"
    assert {p.split("/")[0] for p in context.paths} == CONTEXT_TOP
    assert not [p for p in context.paths if "__pycache__" in p or p.endswith(".pyc")]
    for folder in PRODUCTION:
        assert f"intentflow/{folder}" in context.paths, f"the link intentflow/{folder} is left out"


def test_every_file_the_dockerfile_copies_from_the_context_is_in_it(context: Context) -> None:
    for line, source in context_copies():
        assert source == "." or any(
            p == source or p.startswith(f"{source}/") for p in context.paths
        ), f"Dockerfile line {line} copies {source}, which .dockerignore leaves out"


def test_the_wheel_holds_the_production_packages_and_no_test_code(wheel: Wheel) -> None:
    for folder in PRODUCTION:
        modules = {
            f"intentflow/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
            for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts
        }
        assert modules and modules <= wheel.names, sorted(modules - wheel.names)[:5]
        assert f"intentflow/{folder}/py.typed" in wheel.names
    migrations = {
        f"intentflow/consumer/migrations/{p.name}"
        for p in (ROOT / "consumer" / "migrations").glob("*.sql")
    }
    assert migrations and migrations <= wheel.names
    assert {
        "intentflow/__init__.py",
        "intentflow/healthcheck.py",
        "intentflow/py.typed",
    } <= wheel.names
    foreign = [n for n in wheel.names if not n.startswith(("intentflow/", "intentflow-"))]
    assert not foreign, foreign
    test_code = [n for n in wheel.names if n.split("/")[1:2] and n.split("/")[1] in KEPT_OUT]
    assert not test_code, test_code[:5]


# -- console scripts ----------------------------------------------------------


def declared_scripts() -> dict[str, str]:
    """pyproject's console scripts: name -> module."""
    return {
        name: target.partition(":")[0] for name, target in PYPROJECT["project"]["scripts"].items()
    }


def kept_scripts(wheel: Wheel) -> set[str]:
    return {name for name, module in declared_scripts().items() if wheel.holds(module)}


def test_the_image_offers_only_the_scripts_whose_module_it_holds(
    wheel: Wheel, tmp_path: Path
) -> None:
    # As the build stage does: a venv without pip, the wheel, then deploy/prune_scripts.py.
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    python = str(venv / "bin" / "python")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", python, "install"),
            *("--quiet", "--no-deps", "--no-index", str(wheel.path)),
        ],
        check=True,
        timeout=120,
    )
    declared = set(declared_scripts())
    assert declared <= {p.name for p in (venv / "bin").iterdir()}
    done = subprocess.run(
        [python, str(ROOT / "deploy" / "prune_scripts.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    left = {p.name for p in (venv / "bin").iterdir()} & declared
    assert left == kept_scripts(wheel)
    assert {"order-consumer", "stripe-bridge"} <= left
    assert "replay-duplicates" not in left
    assert "removed replay-duplicates" in done.stdout


def image_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) for each command run in the image: Dockerfile, compose, deploy/k8s."""
    for ins in stages()[-1]:
        if ins.keyword in {"CMD", "ENTRYPOINT"}:
            yield f"Dockerfile line {ins.line}", exec_form(ins)
        if ins.keyword == "HEALTHCHECK":
            yield f"Dockerfile line {ins.line}", json.loads(ins.args.partition("CMD")[2])
    yield from compose_commands()
    yield from k8s_commands()


def compose_commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in compose()["services"].items():
        if "build" not in service and not str(service.get("image", "")).startswith("intentflow"):
            continue
        for key in ("entrypoint", "command"):
            if key in service:
                yield f"compose {name} {key}", argv(service[key])
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            yield f"compose {name} healthcheck", healthcheck_argv(test)


def k8s_commands() -> Iterator[tuple[str, list[str]]]:
    for path in sorted((ROOT / "deploy" / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for container in containers(doc):
                if container.get("image", "").rsplit("/", 1)[-1].split(":")[0] != "intentflow":
                    continue
                if "command" in container:
                    yield f"{path.name} {container.get('name')}", container["command"]
                for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                    if "exec" in container.get(probe, {}):
                        yield f"{path.name} {probe}", container[probe]["exec"]["command"]


def test_every_command_the_image_runs_is_a_script_it_keeps_or_a_module_it_holds(
    wheel: Wheel,
) -> None:
    kept = kept_scripts(wheel)
    seen = set()
    for where, command in image_commands():
        if command[:2] == ["python", "-m"]:
            assert wheel.holds(command[2]), f"{where}: {command[2]} is not in the image"
        else:
            assert command[0] in kept, f"{where}: {command[0]} is no console script in the image"
        seen.add(command[0])
    assert {"order-consumer", "stripe-bridge", "python"} <= seen


# -- the Dockerfile -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    found, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or not (line or pending):
            continue
        start = start if pending else number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        found.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    return found


def stages(text: str | None = None) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for ins in instructions(DOCKERFILE.read_text() if text is None else text):
        if ins.keyword == "FROM":
            found.append([])
        found[-1].append(ins)
    return found


def exec_form(ins: Instruction) -> list[str]:
    try:
        command = json.loads(ins.args)
    except json.JSONDecodeError:
        command = None
    assert isinstance(command, list), f"line {ins.line}: {ins.keyword} in exec form, a JSON list"
    return [str(c) for c in command]


def context_copies() -> Iterator[tuple[int, str]]:
    for stage in stages():
        for ins in stage:
            words = shlex.split(ins.args)
            if ins.keyword in {"COPY", "ADD"} and not any(w.startswith("--from") for w in words):
                for source in [w for w in words if not w.startswith("--")][:-1]:
                    yield ins.line, os.path.normpath(source)


def unpinned_bases(text: str) -> list[str]:
    """The FROM lines whose image is neither an earlier stage nor pinned by a sha256 digest."""
    names: set[str] = set()
    unpinned = []
    for stage in stages(text):
        words = [w for w in stage[0].args.split() if not w.startswith("--")]
        image = words[0]
        if image not in names and not re.fullmatch(r"[\w.\-/:]+@sha256:[0-9a-f]{64}", image):
            unpinned.append(f"line {stage[0].line}: FROM {image}")
        if len(words) == 3 and words[1].lower() == "as":
            names.add(words[2])
    return unpinned


def test_every_base_image_is_pinned_by_digest() -> None:
    assert unpinned_bases(DOCKERFILE.read_text()) == []
    # The check itself: a tag alone is refused, a stage's name is not.
    assert unpinned_bases("FROM python:3.11-slim AS base\nFROM base\n") == [
        "line 1: FROM python:3.11-slim"
    ]


def test_hadolint_passes_and_every_ignored_rule_says_why(tmp_path: Path) -> None:
    # Only the inline pragmas below may ignore a rule: no config file, none of the user's.
    for name in (
        ".hadolint.yaml",
        ".hadolint.yml",
        "deploy/.hadolint.yaml",
        "deploy/.hadolint.yml",
    ):
        assert not (ROOT / name).exists(), f"{name} could ignore rules with no reason given"
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    done = subprocess.run(
        [tool("hadolint"), "--config", str(config), "--no-color", "-t", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    assert unexplained_ignores(DOCKERFILE.read_text()) == []
    assert unexplained_ignores("# hadolint ignore=DL3008\nRUN x\n") == [
        "line 1: # hadolint ignore=DL3008 gives no reason"
    ]
    assert unexplained_ignores("# apt has no versions here\n# hadolint ignore=DL3008\n") == []


def unexplained_ignores(text: str) -> list[str]:
    """`# hadolint ignore=...` pragmas with no reason after them or on the comment line above."""
    lines = text.splitlines()
    found = []
    for n, line in enumerate(lines):
        pragma = re.search(r"#\s*hadolint\s+(?:global\s+)?ignore=\S+(.*)", line)
        if not pragma:
            continue
        above = lines[n - 1].strip() if n else ""
        reason = pragma.group(1).strip(" #:-") or (
            above.startswith("#") and "hadolint" not in above and above.strip("# ")
        )
        if not reason:
            found.append(f"line {n + 1}: {line.strip()} gives no reason")
    return found


def test_the_image_runs_as_a_user_and_takes_only_the_built_environment() -> None:
    build, final = stages()[-2], stages()[-1]
    runs = " ".join(ins.args for ins in build if ins.keyword == "RUN")
    assert "--require-hashes --no-deps -r deploy/requirements.lock" in runs
    assert "--require-hashes --no-deps -r deploy/build.lock" in runs
    assert "deploy/prune_scripts.py" in runs
    assert "COPY . ." in {f"{i.keyword} {i.args}" for i in build}, "the wheel fixture assumes it"
    for ins in final:
        if ins.keyword in {"COPY", "ADD"}:
            assert ins.args.startswith("--from="), f"line {ins.line}: copies from the context"
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    keywords = [ins.keyword for ins in final]
    assert "HEALTHCHECK" in keywords and "EXPOSE" in keywords
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    for host in ("BRIDGE_HOST", "BRIDGE_ADMIN_HOST", "CONSUMER_HTTP_HOST"):
        assert f"{host}=0.0.0.0" in env, host


# -- the locks ----------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) from a `name==version --hash=...` requirements file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip().rstrip("\\").strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("--hash="):
            entries[current][1].append(line.removeprefix("--hash="))
            continue
        pinned = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)(\s*;.*)?", line)
        assert pinned, f"{path.name}: {raw!r} is not name==version: run `make lock`"
        current = canonical(pinned[1])
        entries[current] = (pinned[2], [])
    return entries


def test_the_lock_pins_every_runtime_dependency_at_pyprojects_version_with_hashes() -> None:
    locked = read_lock(LOCK)
    for spec in PYPROJECT["project"]["dependencies"]:
        req = Requirement(spec)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        assert pins, f"pyproject.toml: {spec} is not pinned with =="
        name = canonical(req.name)
        assert name in locked, f"{name} is not in deploy/requirements.lock: run `make lock`"
        assert locked[name][0] == pins[0], f"{name}: {locked[name][0]} locked, {pins[0]} wanted"
    for path, entries in ((LOCK, locked), (BUILD_LOCK, read_lock(BUILD_LOCK))):
        for name, (_, hashes) in entries.items():
            assert hashes, f"{path.name}: {name} has no hash"
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_holds_no_package_only_the_extras_need() -> None:
    runtime = {canonical(Requirement(s).name) for s in PYPROJECT["project"]["dependencies"]}
    extras = {
        canonical(Requirement(s).name)
        for group in PYPROJECT["project"]["optional-dependencies"].values()
        for s in group
    }
    only_extras = (extras - runtime) & set(read_lock(LOCK))
    assert not only_extras, f"deploy/requirements.lock holds {sorted(only_extras)}"


def test_the_build_lock_pins_a_backend_pyproject_accepts() -> None:
    locked = read_lock(BUILD_LOCK)
    for spec in PYPROJECT["build-system"]["requires"]:
        req = Requirement(spec)
        assert req.specifier.contains(locked[canonical(req.name)][0]), spec


def test_the_build_backends_pyproject_accepts_read_its_license_expression() -> None:
    # A string `license` is an SPDX expression (PEP 639): setuptools reads one from 77 on,
    # and 76 and older refuse pyproject.toml ("`project.license` must be valid exactly by
    # one definition"), so `requires` must not let a builder pick them.
    assert isinstance(PYPROJECT["project"]["license"], str)
    (spec,) = PYPROJECT["build-system"]["requires"]
    req = Requirement(spec)
    assert canonical(req.name) == "setuptools"
    assert not req.specifier.contains("76.1.0"), f"{spec}: setuptools 77 or newer"


# What the image's Python and platform evaluate markers with (python:3.11-slim, amd64).
IMAGE_MARKERS = {
    "python_version": "3.11",
    "python_full_version": "3.11.14",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def test_the_lock_holds_every_package_the_runtime_dependencies_need() -> None:
    # The Dockerfile installs the lock with --no-deps: a package missing from it would be
    # found only by the image build's `pip check`. Here: the runtime dependencies and,
    # through each one's installed metadata, all that they require in the image.
    locked = read_lock(LOCK)
    todo = [Requirement(s) for s in PYPROJECT["project"]["dependencies"]]
    seen: set[str] = set()
    missing: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        if name not in locked:
            missing.add(name)
            continue
        for spec in distribution(name).requires or []:
            needed = Requirement(spec)
            if needed.marker is None or needed.marker.evaluate(IMAGE_MARKERS):
                todo.append(needed)
    assert not missing, f"deploy/requirements.lock lacks {sorted(missing)}: run `make lock`"


# -- compose ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def argv(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def healthcheck_argv(test: str | list[str]) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    if test[0] == "CMD-SHELL":
        return shlex.split(test[1])
    return [str(t) for t in test[1:]] if test[0] == "CMD" else [str(t) for t in test]


def containers(doc: Any) -> Iterator[dict[str, Any]]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from containers(value)
    elif isinstance(doc, list):
        for item in doc:
            yield from containers(item)


def test_compose_validates_against_the_compose_specification() -> None:
    # The schema is vendored in check-jsonschema's wheel: no network.
    done = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def healthchecked(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return (
        bool(check.get("test"))
        and not check.get("disable")
        and check["test"] not in ("NONE", ["NONE"])
    )


def startup_problems(services: dict[str, Any]) -> list[str]:
    """Why the compose file's start order is not right (empty when it is)."""
    problems = []
    awaited: dict[str, set[str]] = {name: set() for name in services}
    for name, service in services.items():
        needs = service.get("depends_on") or {}
        if isinstance(needs, list):
            problems.append(f"{name}: depends_on without conditions")
            continue
        for other, how in needs.items():
            condition = (how or {}).get("condition")
            awaited[other].add(str(condition))
            if condition == "service_healthy" and not healthchecked(services[other]):
                problems.append(f"{name} waits for {other} to be healthy; it has no healthcheck")
            elif condition not in {"service_healthy", "service_completed_successfully"}:
                problems.append(f"{name}: depends_on {other} with condition {condition}")
    for name, service in services.items():
        if healthchecked(service):
            continue
        one_shot = awaited[name] == {"service_completed_successfully"}
        if not one_shot or service.get("restart", "no") not in {"no", "on-failure"}:
            problems.append(f"{name}: no healthcheck, and no one-shot others wait to complete")
    return problems


def test_every_service_is_healthchecked_or_one_shot_and_starts_on_conditions() -> None:
    services = compose()["services"]
    assert startup_problems(services) == []
    assert {"kafka", "postgres", "bridge", "consumer"} <= {
        n for n, s in services.items() if healthchecked(s)
    }
    without = {
        **services,
        "bridge": {k: v for k, v in services["bridge"].items() if k != "healthcheck"},
    }
    assert startup_problems(without) == [
        "bridge: no healthcheck, and no one-shot others wait to complete"
    ]


def test_every_long_running_service_restarts_and_no_one_shot_does() -> None:
    """A crash, or an exit 2 while the broker or the database is still away, is followed by
    a restart; `docker compose stop` is not undone. A one-shot runs once: the services that
    wait for it to complete read its one exit."""
    services = compose()["services"]
    for name, service in services.items():
        if healthchecked(service):
            assert service.get("restart") == "unless-stopped", name
        else:
            assert service.get("restart") == "no", name


# The grace each process gets beyond its own shutdown deadline before Docker's SIGKILL.
COMPOSE_GRACE_MARGIN_S = 10


def seconds(duration: str) -> float:
    """A compose duration (`1m30s`, `45s`, `500ms`) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_lets_each_process_finish_its_shutdown_before_killing_it() -> None:
    assert seconds("1m30s") == 90 and seconds("500ms") == 0.5
    services = compose()["services"]
    for name, settings in (("bridge", BridgeSettings), ("consumer", ConsumerSettings)):
        service = services[name]
        deadline = float(
            service["environment"].get(
                "SHUTDOWN_TIMEOUT_S", settings.model_fields["shutdown_timeout_s"].default
            )
        )
        grace = seconds(str(service.get("stop_grace_period", "10s")))
        assert grace >= deadline + COMPOSE_GRACE_MARGIN_S, (name, grace, deadline)
