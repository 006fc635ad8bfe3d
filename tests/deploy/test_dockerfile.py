"""deploy/Dockerfile, read rather than built (no docker here): what it copies exists and is
not excluded from the build context, it runs as a non-root user, serves the code location
on the port the stack uses, and every Python-level command it runs exists in this project's
environment and accepts the arguments it is given."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cfnlint.decode import decode_str

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / "deploy" / "Dockerfile.dockerignore"
BIN = Path(sys.executable).parent
PY_COMMANDS = {"pip", "python", "python3", "dagster", "dagster-dbt", "dbt", "dagster-webserver", "dagster-daemon"}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs; continuation lines joined, comment lines dropped."""
    result, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        result.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "dangling line continuation"
    return result


def of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def env_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for args in of("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            values[key] = value
    return values


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context."""
    result = []
    for args in of("COPY"):
        tokens = shlex.split(args)
        if any(t.startswith("--from") for t in tokens):
            continue
        paths = [t for t in tokens if not t.startswith("--")]
        result.append((paths[:-1], paths[-1]))
    return result


ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def run_commands_with_env() -> list[tuple[dict[str, str], list[str]]]:
    """Every simple command of every RUN (split on && and ;), with its leading
    VAR=value assignments."""
    commands = []
    for args in of("RUN"):
        for part in re.split(r"&&|;", args):
            tokens = shlex.split(part)
            env = {}
            while tokens and ASSIGNMENT.match(tokens[0]):
                key, _, value = tokens.pop(0).partition("=")
                env[key] = value
            if tokens:
                commands.append((env, tokens))
    return commands


def run_commands() -> list[list[str]]:
    return [tokens for _, tokens in run_commands_with_env()]


# ---------------------------------------------------------------- .dockerignore semantics
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):
                out, i = out + "(?:/)?", i + 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(relpath: str, rules) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory
    matches everything below it."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            result = not negate
    return result


# ---------------------------------------------------------------------------- tests
def test_base_image():
    (base,) = of("FROM")
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?", base), base


def test_every_copy_source_exists_in_the_build_context():
    sources = [src for srcs, _ in copies() for src in srcs]
    assert sources, "nothing copied"
    missing = [src for src in sources if not list(REPO_ROOT.glob(src.rstrip("/")))]
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_copied_files_are_not_dockerignored():
    rules = dockerignore_rules()
    for sources, _ in copies():
        for src in sources:
            root = REPO_ROOT / src.rstrip("/")
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            for path in files:
                rel = path.relative_to(REPO_ROOT).as_posix()
                if "__pycache__" in rel or re.match(r"dbt/(target|logs|dbt_packages)/", rel):
                    continue
                assert not excluded(rel, rules), f"{rel} is copied but excluded from the context"


def test_dockerignore_self_check():
    rules = dockerignore_rules()
    assert excluded(".git/config", rules)
    assert excluded("tests/conftest.py", rules)
    assert excluded(".local/platform.env", rules)
    assert excluded("platform_assets/__pycache__/x.pyc", rules)
    assert not excluded("platform_assets/definitions.py", rules)
    assert excluded("dbt/target/manifest.json", rules)


def test_pinned_install():
    installs = [c for c in run_commands() if c[:2] == ["pip", "install"]]
    assert installs == [["pip", "install", "-c", "constraints.txt", "."]]
    copied = {Path(src).name for srcs, _ in copies() for src in srcs}
    assert {"pyproject.toml", "constraints.txt"} <= copied
    # Every direct dependency is pinned, at the same version, in constraints.txt.
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==([^;\s]+)", dep.replace(" ", ""))
        assert match, f"{dep} is not pinned exactly in pyproject.toml"
        name = match.group(1).lower().replace("_", "-")
        assert pins.get(name) == match.group(3), f"{dep} vs constraints.txt {pins.get(name)}"


def test_python_level_commands_exist_in_the_project_environment():
    used = {c[0] for c in run_commands() if c[0] in PY_COMMANDS}
    assert {"pip", "dagster-dbt"} <= used
    for name in used | {"dagster"}:
        assert (BIN / name).exists(), f"{name} not found next to {sys.executable}"


def test_prepare_and_package_runs_at_build_time():
    (command,) = [c for c in run_commands() if c[0] == "dagster-dbt"]
    assert command[:3] == ["dagster-dbt", "project", "prepare-and-package"]
    target = command[command.index("--file") + 1]
    assert target == "platform_assets/project.py"
    proc = subprocess.run(
        [str(BIN / "dagster-dbt"), *command[1:3], "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--file" in proc.stdout
    project = REPO_ROOT / target
    assert project.exists(), f"{target} is what the image build prepares; it does not exist"


# How `dagster-dbt project prepare-and-package --file X` finds the project (dagster_dbt.cli):
# X is imported as a standalone file, not as a module of its package.
LOAD_LIKE_DAGSTER_DBT = """
import json, sys
from dagster._core.code_pointer import load_python_file
from dagster._core.definitions.module_loaders.load_assets_from_modules import (
    find_objects_in_module_of_types,
)
from dagster_dbt import DbtProject
module = load_python_file(sys.argv[1], working_directory=None, add_uuid_suffix=True)
projects = list(find_objects_in_module_of_types(module, types=DbtProject))
print(json.dumps([
    {"target": p.target, "manifest": str(p.manifest_path), "project_dir": str(p.project_dir),
     "packaged_dir": str(p.packaged_project_dir) if p.packaged_project_dir else None}
    for p in projects
]))
"""


def test_prepare_and_package_finds_the_prod_project():
    """The build step as the image runs it (same env assignments, PYTHONPATH = the source
    tree) finds exactly one DbtProject, for the prod target, and the pipeline uploads the
    manifest from where that project writes it."""
    ((env, command),) = [(e, c) for e, c in run_commands_with_env() if c[0] == "dagster-dbt"]
    assert env.get("PLATFORM_ENV") == "prod"
    target = command[command.index("--file") + 1]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_LIKE_DAGSTER_DBT, target],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": str(BIN), "HOME": str(REPO_ROOT), "PYTHONPATH": str(REPO_ROOT), **env},
    )
    assert proc.returncode == 0, (
        f"dagster-dbt cannot load {target} the way the image build does:\n{proc.stderr[-2000:]}"
    )
    (project,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert project["target"] == "prod"
    # prepare-and-package deletes packaged_project_dir before copying project_dir into it.
    assert project["packaged_dir"] != project["project_dir"], (
        "packaged_project_dir == project_dir: prepare-and-package would rmtree the dbt project"
    )
    manifest = Path(project["manifest"]).resolve().relative_to(REPO_ROOT).as_posix()
    workflow = (REPO_ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    assert f"{of('WORKDIR')[-1]}/{manifest}" in workflow, manifest


def test_runs_as_non_root_user():
    users = of("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    kinds = [kw for kw, _ in instructions()]
    assert kinds.index("USER") > max(i for i, kw in enumerate(kinds) if kw == "RUN")


def test_cmd_serves_the_code_location():
    (cmd,) = of("CMD")
    argv = json.loads(cmd)  # exec form: no shell between ECS and dagster
    assert argv[:3] == ["dagster", "api", "grpc"]
    assert argv[argv.index("-m") + 1] == "platform_assets.definitions"
    port = argv[argv.index("-p") + 1]
    assert argv[argv.index("-h") + 1] == "0.0.0.0"
    assert of("EXPOSE") == [port] == ["4000"]
    proc = subprocess.run([str(BIN / "dagster"), "api", "grpc", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--host", "--port", "--module-name"):
        assert flag in proc.stdout


def test_healthcheck_probes_the_default_cmd_like_the_code_server_task():
    """The image's HEALTHCHECK checks the gRPC server the default CMD starts, with a command
    that exists here and takes that port; the code server's ECS task definition (the only
    health check ECS acts on) runs the same command."""
    (healthcheck,) = of("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    argv = json.loads(command)  # exec form: no shell needed in the image
    assert argv[:3] == ["dagster", "api", "grpc-health-check"]
    (cmd,) = of("CMD")
    served = json.loads(cmd)
    assert argv[argv.index("-p") + 1] == served[served.index("-p") + 1] == "4000"
    flags = dict(option.lstrip("-").split("=", 1) for option in options.split())
    assert set(flags) == {"interval", "timeout", "start-period", "retries"}
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:3], "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--port" in proc.stdout

    template, _ = decode_str((REPO_ROOT / "deploy" / "aws" / "platform.yaml").read_text())
    (container,) = template["Resources"]["CodeServerTaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert list(container["HealthCheck"]["Command"]) == ["CMD", *argv]
    assert "Command" not in container  # the code server runs the image's CMD


def test_instance_and_workspace_in_dagster_home(monkeypatch: pytest.MonkeyPatch):
    from dagster._core.workspace.config_schema import process_workspace_config

    home = env_values()["DAGSTER_HOME"]
    assert (["deploy/dagster.yaml"], f"{home}/dagster.yaml") in copies()
    assert env_values().get("PYTHONPATH") == of("WORKDIR")[-1]

    (printf,) = [c for c in run_commands() if c[0] == "printf" and "workspace.yaml" in c[-1]]
    assert printf[-1] == f"{home}/workspace.yaml"
    workspace_text = "\n".join(printf[2 : printf.index(">")])
    monkeypatch.setenv("DAGSTER_CODE_SERVER_HOST", "code.platform.dagster.internal")
    import yaml

    result = process_workspace_config(yaml.safe_load(workspace_text))
    assert result.success, result.errors
    (entry,) = result.value["load_from"]
    server = entry["grpc_server"]
    assert server["host"] == "code.platform.dagster.internal"
    assert server["port"] == 4000 and server["location_name"] == "platform_assets"

    # The webserver and daemon task definitions use that workspace file and executables
    # that exist in this environment.
    template, _ = decode_str((REPO_ROOT / "deploy" / "aws" / "platform.yaml").read_text())
    for td in ("WebserverTaskDefinition", "DaemonTaskDefinition"):
        (container,) = template["Resources"][td]["Properties"]["ContainerDefinitions"]
        command = list(container["Command"])
        assert command[command.index("-w") + 1] == f"{home}/workspace.yaml"
        assert (BIN / command[0]).exists(), command[0]
