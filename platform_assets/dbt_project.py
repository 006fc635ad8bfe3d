"""The dbt project as Dagster sees it, for one resolved environment.

One resolved environment feeds both the parsed manifest and the dbt resource, so the graph
that is parsed is the graph that runs. Each environment parses into its own target folder
(`target/<env>`), whose partial-parse state every dbt command of the environment starts
from (dbt's `--partial-parse-file-path`): dbt's own partial parsing, nothing kept by hand. dbt
uses it only with the connection settings it was parsed with (in production the image parses
with placeholders, so there each command parses the project itself).
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from pathlib import Path

from dagster_dbt import DbtCliResource, DbtProject

from .settings import DBT_PROJECT_DIR, PlatformSettings

# The environment's own dbt, whether or not its bin folder is on PATH.
_VENV_DBT = Path(sys.executable).parent / "dbt"
DBT_EXECUTABLE = str(_VENV_DBT) if _VENV_DBT.exists() else "dbt"
PROJECT_FOLDERS = ("models", "macros", "snapshots", "tests", "seeds", "analyses")
PROJECT_FILES = ("dbt_project.yml", "profiles.yml", "packages.yml")
# dagster-dbt gives every dbt command a run folder and never removes it (about 3 MB each).
KEPT_RUN_FOLDERS = 50
RUN_FOLDER_MIN_AGE_S = 3600


def project_for(settings: PlatformSettings) -> DbtProject:
    """The project for this environment, as it is on disk (nothing parsed)."""
    return DbtProject(
        project_dir=DBT_PROJECT_DIR,
        profiles_dir=DBT_PROJECT_DIR,
        target=settings.dbt_target,
        target_path=f"target/{settings.env}",
    )


def dbt_project_for(settings: PlatformSettings) -> DbtProject:
    """The project for this environment, its manifest parsed if need be: under `dagster dev`
    (dagster-dbt's prepare_if_dev), and in the local environments whenever a project file is
    newer than the manifest. prod loads the manifest `prepare-and-package` built into the image."""
    project = project_for(settings)
    if settings.env != "prod" and manifest_is_stale(project):
        project.preparer.prepare(project)
    else:
        project.prepare_if_dev()
    return project


def parse_state_path(project: DbtProject) -> Path:
    """The partial-parse state the preparation's `dbt parse` saved."""
    return Path(project.project_dir) / project.target_path / "partial_parse.msgpack"


def manifest_is_stale(project: DbtProject) -> bool:
    """No manifest or parse state, or a file or folder of the project changed after the
    manifest was written (a removed file changes its folder's modification time)."""
    try:
        parsed = project.manifest_path.stat().st_mtime
    except FileNotFoundError:
        return True
    if not parse_state_path(project).exists():
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
    """dagster-dbt's resource for this project; every command starts from the preparation's
    parse state (if there is one), so an unchanged project is not parsed again by each command
    run with the connection settings it was parsed with (dbt parses in full otherwise)."""
    state = parse_state_path(project)
    return DbtCliResource(
        project_dir=project,
        profiles_dir=str(project.profiles_dir),
        target=project.target,
        dbt_executable=DBT_EXECUTABLE,
        global_config_flags=["--partial-parse-file-path", str(state)] if state.exists() else [],
    )


def run_target_path(project: DbtProject, context) -> Path:
    """A fresh folder for one dbt command, under the environment's own `runs/`."""
    name = f"{context.op_execution_context.op.name}-{context.run.run_id[:7]}-{uuid.uuid4().hex[:7]}"
    return Path(project.project_dir) / project.target_path / "runs" / name


def prune_run_folders(runs_dir: Path, keep: int = KEPT_RUN_FOLDERS,
                      min_age_s: float = RUN_FOLDER_MIN_AGE_S) -> list[Path]:
    """Remove the run folders beyond the `keep` most recent, except those used in the last
    `min_age_s` seconds (another process's dbt command may still be writing there)."""
    now = time.time()
    folders = []
    for folder in runs_dir.iterdir() if runs_dir.is_dir() else ():
        try:
            if folder.is_dir():
                log = folder / "dbt.log"
                used = max(folder.stat().st_mtime, log.stat().st_mtime if log.exists() else 0)
                folders.append((used, folder))
        except FileNotFoundError:  # removed by another process meanwhile
            continue
    removed = []
    for used, folder in sorted(folders, reverse=True)[keep:]:
        if now - used >= min_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed
