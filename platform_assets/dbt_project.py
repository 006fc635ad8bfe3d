"""The dbt project as Dagster sees it, for one resolved environment.

One resolved environment feeds both the parsed manifest and the dbt resource, so the graph
that is parsed is the graph that runs. Each environment parses into its own target folder
(`target/<env>`). dbt uses a partial-parse state only with the connection settings it was
parsed with, so the state is kept per connection profile (`target/<env>/parse-states/<key>
.msgpack`, the key a hash of the connection variables profiles.yml reads, passwords left
out): each command starts from its profile's state and leaves the one it ends with. The
manifest names the warehouse database in every relation, so a load with another one parses
it again (manifest_for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource, DbtProject

from .settings import DBT_PROJECT_DIR, ConfigurationError, PlatformSettings, held

# The environment's own dbt, behind platform-dbt (dbt_launcher.py: `--version` without PyPI)
# when this project's scripts are installed, whether or not its bin folder is on PATH.
_BIN = Path(sys.executable).parent
DBT_EXECUTABLE = next((str(p) for p in (_BIN / "platform-dbt", _BIN / "dbt") if p.exists()), "dbt")
PROJECT_FOLDERS = ("models", "macros", "snapshots", "tests", "seeds", "analyses")
PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "packages.yml")
# parse states (about 1 MB each) of the most recently used connection profiles
KEPT_PARSE_STATES = 20
PARSE_STATE = "partial_parse.msgpack"
# beside the environment's manifest: the warehouse setting it was parsed with (database_setting)
DATABASE_MARK = "manifest.database"


def project_for(settings: PlatformSettings) -> DbtProject:
    """The project for this environment, as it is on disk (nothing parsed)."""
    return DbtProject(
        project_dir=DBT_PROJECT_DIR,
        profiles_dir=DBT_PROJECT_DIR,
        target=settings.dbt_target,
        target_path=f"target/{settings.env}",
    )


def manifest_for(project: DbtProject, settings: PlatformSettings) -> dict:
    """The parsed manifest, with this environment's warehouse database in its relations (dbt
    writes the profile's database into every relation it parses: the catalog's table names,
    the tables dagster-dbt counts and describes after a build).

    Locally it is read under the preparation's lock, parsed first (`prepare`) when a project
    file is newer than it or it was parsed for another warehouse database. This stands in for
    dagster-dbt's prepare_if_dev, whose preparer parses in every run worker of `dagster dev`,
    changed or not, after a plain `dbt --version` that asks PyPI for the latest releases.
    Prod loads the manifest `prepare-and-package` built into the image, which must have been
    built for REDSHIFT_DB."""
    database = database_setting(settings)
    if settings.env != "prod":
        target = Path(project.project_dir) / project.target_path
        target.mkdir(parents=True, exist_ok=True)
        with held(target / "prepare.lock"):  # one process parses; those waiting then find it fresh
            if manifest_is_stale(project, database):
                prepare(project, database)
            return read_manifest(project, reparse=True, database=database)
    manifest = read_manifest(project)
    parsed_for = manifest_database(manifest)
    # Redshift folds unquoted names to lower case, as dbt-redshift compares them
    if database is not None and parsed_for is not None and parsed_for.casefold() != database.casefold():
        raise ConfigurationError(
            f"the image's dbt manifest was parsed for the warehouse database {parsed_for!r} but REDSHIFT_DB"
            f" is {database!r}: its table names and row counts would name the wrong database; build the"
            f" image with --build-arg REDSHIFT_DB={database} (deploy/Dockerfile)")
    return manifest


def manifest_database(manifest: dict) -> str | None:
    """The database of the manifest's models: the one its profile named when it was parsed."""
    return next((node.get("database") for node in manifest.get("nodes", {}).values()
                 if node.get("resource_type") == "model"), None)


def database_setting(settings: PlatformSettings) -> str | None:
    """The setting dbt takes the warehouse database of its relations from: the DuckDB file's
    name (dbt-duckdb derives the database from it), WAREHOUSE_PG_DB or REDSHIFT_DB. Unset, it
    is the run's preflight that says so."""
    if settings.engine == "duckdb":
        path = settings.optional("DUCKDB_PATH")
        return Path(path).name if path else None
    return settings.optional({"postgres": "WAREHOUSE_PG_DB", "redshift": "REDSHIFT_DB"}[settings.engine])


def prepare(project: DbtProject, database: str | None = None, publish: bool = True) -> None:
    """One `dbt parse` through platform-dbt in a folder of its own, whose parse state becomes
    this profile's. With `publish` (the preparation) its manifest, state and `database` (the
    warehouse setting it parsed with, database_setting) then replace the environment's, each
    by an atomic rename, the manifest last: a loading process never meets a half-written one."""
    target = Path(project.project_dir) / project.target_path
    runs = target / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prepare-", dir=runs) as folder:
        started = time.time()
        start_dbt(dbt_resource(project), project, ["parse", "--quiet"], Path(folder)).wait()
        keep_command_state(project, Path(folder), logging.getLogger(__name__))
        if publish:
            # dated when the parse began: a file saved while dbt parsed leaves the manifest stale
            os.utime(Path(folder) / "manifest.json", (started, started))
            # the setting and the manifest's time (a rename keeps it): a manifest rewritten
            # otherwise (a `dbt parse` by hand) no longer matches its mark
            mark = f"{database or ''}\n{(Path(folder) / 'manifest.json').stat().st_mtime_ns}"
            (Path(folder) / DATABASE_MARK).write_text(mark)
            for name in (PARSE_STATE, DATABASE_MARK, "manifest.json"):
                os.replace(Path(folder) / name, target / name)


def start_dbt(dbt: DbtCliResource, project: DbtProject, args: list[str], target: Path,
              context: dg.AssetExecutionContext | None = None):
    """dbt `args` in the run folder `target`, starting from its profile's parse state
    (keep_command_state keeps the one it ends with)."""
    seed_parse_state(project, target)
    return dbt.cli(args, context=context, target_path=target)


def keep_command_state(project: DbtProject, target: Path, log) -> None:
    """The parse state in this command's folder (the one it started from, or the one dbt wrote
    once parsing changed anything, whatever the build's outcome) becomes its profile's (module
    docstring): the next command starts from it instead of parsing the whole project
    again. A state dbt cannot read costs one full parse."""
    kept, written = parse_state_path(project), target / PARSE_STATE
    if not written.exists():
        return
    try:
        keep_parse_state(kept, written)
    except OSError as exc:  # housekeeping: the next command parses in full, nothing else
        log.warning(f"could not keep dbt's parse state {written} as {kept}: {exc}")


def seed_parse_state(project: DbtProject, folder: Path) -> None:
    """Put this profile's parse state (else the preparation's) in a dbt command's target folder,
    where dbt reads it and, if parsing changed anything, rewrites it. Else the folder would get
    whatever `target/partial_parse.msgpack` a plain `dbt` in the project left (dagster-dbt
    copies it in), and that would be kept as this profile's."""
    folder.mkdir(parents=True, exist_ok=True)
    for state in (parse_state_path(project), prepared_state_path(project)):
        try:
            shutil.copyfile(state, folder / PARSE_STATE)
            return
        except OSError:  # none yet, or pruned meanwhile (then dbt parses in full)
            continue


def read_manifest(project: DbtProject, attempts: int = 40, reparse: bool = False,
                  database: str | None = None, parsed_again: bool = False) -> dict:
    """The parsed manifest. The preparation replaces it by a rename, but a `dbt parse` run by
    hand into the environment's target folder writes it in place: a read that meets it
    half-written waits a moment and reads again. One still cut short after that
    was left by a parse that was stopped: with `reparse` (the local environments) the project
    is prepared again, else (prod's packaged manifest) the load fails naming the file."""
    for _ in range(attempts - 1):
        try:
            return json.loads(project.manifest_path.read_text())
        except json.JSONDecodeError:
            time.sleep(0.25)
    try:
        return json.loads(project.manifest_path.read_text())
    except json.JSONDecodeError as exc:
        problem = f"{project.manifest_path} is not whole JSON after {(attempts - 1) * 0.25:g} s ({exc})"
        if parsed_again:
            raise ValueError(f"{problem}, although the project was just parsed again: is a `dbt parse`"
                             " by hand writing into that folder?") from exc
        if not reparse:
            raise ValueError(f"{problem}: a dbt parse stopped while writing it? Build the image again"
                             " (`dagster-dbt project prepare-and-package`).") from exc
        logging.getLogger(__name__).warning(f"{problem}: a dbt parse stopped while writing it; parsing again")
    prepare(project, database)
    # a `dbt parse` by hand may be rewriting it already
    return read_manifest(project, attempts, database=database, parsed_again=True)


def prepared_state_path(project: DbtProject) -> Path:
    """The partial-parse state the preparation's `dbt parse` saved."""
    return Path(project.project_dir) / project.target_path / PARSE_STATE


# Variables left out of the key: credentials change no parse, and a hash of them in a file
# name would be something to test password guesses against.
_NOT_IN_KEY = re.compile(r"PASSWORD|SECRET|TOKEN")


def profile_key() -> str:
    """A hash of the values of the connection variables profiles.yml reads."""
    names = sorted({name for name in re.findall(r"env_var\(\s*['\"](\w+)['\"]",
                                                 (DBT_PROJECT_DIR / "profiles.yml").read_text())
                    if not _NOT_IN_KEY.search(name)})
    values = "\n".join(f"{name}={os.environ.get(name, '')}" for name in names)
    return hashlib.sha256(values.encode()).hexdigest()[:16]


def parse_state_path(project: DbtProject) -> Path:
    """This connection profile's partial-parse state (module docstring)."""
    return Path(project.project_dir) / project.target_path / "parse-states" / f"{profile_key()}.msgpack"


def keep_parse_state(target: Path, state: Path) -> None:
    """Make `state` (one dbt wrote with this process's profile) the profile's parse state
    `target`: an atomic replace (a dbt command reading it sees the old file or the new one),
    then only the most recently kept states stay beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        shutil.copyfile(state, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    states = []
    for path in target.parent.glob("*.msgpack"):
        try:
            states.append((path.stat().st_mtime, path))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    for _, old in sorted(states, reverse=True)[KEPT_PARSE_STATES:]:
        old.unlink(missing_ok=True)


def manifest_is_stale(project: DbtProject, database: str | None = None) -> bool:
    """No manifest or parse state, a manifest another dbt-core wrote (an upgrade), one parsed
    with another warehouse setting than `database` (when given), or a file or folder of the
    project changed after the manifest was written (a removed file changes its folder's
    modification time)."""
    try:
        parsed = project.manifest_path.stat().st_mtime
        with project.manifest_path.open("rb") as manifest:
            head = manifest.read(4096).decode(errors="replace")  # dbt writes its metadata first
    except FileNotFoundError:
        return True
    written_by = re.search(r'"dbt_version":\s*"([^"]+)"', head)
    if not prepared_state_path(project).exists() or not written_by or written_by[1] != version("dbt-core"):
        return True
    if database is not None:
        try:
            mark = (project.manifest_path.parent / DATABASE_MARK).read_text()
        except FileNotFoundError:
            return True
        if mark != f"{database}\n{project.manifest_path.stat().st_mtime_ns}":
            return True
    root = Path(project.project_dir)
    paths = [root / name for name in PROJECT_FILES]
    for folder in PROJECT_FOLDERS:
        paths += [root / folder, *(root / folder).rglob("*")]
    for path in paths:
        try:
            if path.stat().st_mtime > parsed:
                return True
        except FileNotFoundError:
            continue
    return False


def dbt_resource(project: DbtProject) -> DbtCliResource:
    """dagster-dbt's resource for this project, through platform-dbt (dbt_launcher.py)."""
    return DbtCliResource(
        project_dir=project,
        profiles_dir=str(project.profiles_dir),
        target=project.target,
        dbt_executable=DBT_EXECUTABLE,
    )
