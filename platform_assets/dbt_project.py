"""The dbt project as Dagster sees it, for one resolved environment.

One resolved environment feeds both the parsed manifest and the dbt resource, so the graph
that is parsed is the graph that runs. Each environment parses into its own target folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

from dagster_dbt import DbtProject

from .settings import DBT_PROJECT_DIR, PlatformSettings


def dbt_project_for(settings: PlatformSettings, prepare: bool = True) -> DbtProject:
    project = DbtProject(
        project_dir=DBT_PROJECT_DIR,
        profiles_dir=DBT_PROJECT_DIR,
        target=settings.dbt_target,
        target_path=f"target/{settings.env}",
    )
    if not prepare:
        return project
    # Locally the manifest is re-parsed whenever a file of the dbt project is newer than it,
    # so the graph Dagster loads is always the one on disk. prod expects the manifest the
    # image build parsed (`dagster-dbt project prepare-and-package`).
    if settings.env != "prod" and manifest_is_stale(project, warehouse_database(settings)):
        settings.export_for_subprocesses()
        project.preparer.prepare(project)
    return project


def warehouse_database(settings: PlatformSettings) -> str | None:
    """The database dbt names the warehouse's relations with under these settings (the
    manifest records it, and dagster-dbt's metadata queries use it), if known before parsing:
    the DuckDB file's stem, or WAREHOUSE_PG_DB."""
    if settings.engine == "duckdb":
        path = settings.optional("DUCKDB_PATH")
        return Path(path).stem if path and path != ":memory:" else None
    if settings.engine == "postgres":
        return settings.optional("WAREHOUSE_PG_DB")
    return None


def manifest_is_stale(project: DbtProject, database: str | None = None) -> bool:
    """A file of the dbt project is newer than the manifest, or the manifest was parsed for
    another warehouse database (e.g. another WAREHOUSE_PG_DB: dagster-dbt's metadata queries
    would name the old one, which PostgreSQL refuses as a cross-database reference)."""
    if not project.manifest_path.exists():
        return True
    if database is not None and database not in _manifest_databases(project.manifest_path):
        return True
    parsed_at = project.manifest_path.stat().st_mtime
    root = Path(project.project_dir)
    for folder in ("models", "macros", "snapshots", "tests", "seeds", "analyses"):
        for path in (root / folder).rglob("*"):
            if path.is_file() and path.stat().st_mtime > parsed_at:
                return True
    return any(
        (root / name).exists() and (root / name).stat().st_mtime > parsed_at
        for name in ("dbt_project.yml", "profiles.yml", "packages.yml")
    )


# -- warm parsing ---------------------------------------------------------------------------
# dagster-dbt gives every dbt invocation a fresh target folder and seeds it with the
# partial_parse.msgpack of $DBT_TARGET_PATH (default `target/`), which is not the folder this
# environment parses into. dbt then re-parses the whole project on every run (5-10 s), also
# because it throws the parse state away when the profile (e.g. DUCKDB_PATH) or the --vars
# differ from the ones it was saved with. So each run folder is seeded from, and after the run
# gives back, the state of the last invocation with the same profile. (The daily facts'
# partition window is passed in the environment, not in --vars, for the same reason: see
# dbt_assets.window_env.)
PARTIAL_PARSE = "partial_parse.msgpack"
PARSE_STATES = "parse-states"
# dbt keys its parse state on the target's connection details (`connection_info()`): these
# are the settings they come from, per engine. One kept state per combination.
PROFILE_SETTINGS = {
    "duckdb": ("DUCKDB_PATH",),
    "postgres": ("WAREHOUSE_PG_HOST", "WAREHOUSE_PG_PORT", "WAREHOUSE_PG_DB", "WAREHOUSE_PG_USER"),
    "redshift": ("REDSHIFT_HOST", "REDSHIFT_PORT", "REDSHIFT_DB", "REDSHIFT_USER"),
}
# Run folders kept per environment (each about 3 MB: dbt's manifest, parse state, log and
# results of one invocation), the most recent, and never one used in the last hour.
KEPT_RUN_FOLDERS = 50
RUN_FOLDER_MIN_AGE_S = 3600
# Parse states kept per environment (about 1 MB each), the most recently used: the demo's
# warehouse, the benchmark's, a few test warehouses.
KEPT_PARSE_STATES = 8


def prepared_parse_state(project: DbtProject) -> Path:
    """The parse state the manifest's preparation saved (`dbt parse` into target/<env>/)."""
    return Path(project.project_dir) / project.target_path / PARTIAL_PARSE


def run_target_path(project: DbtProject, op_name: str, run_id: str) -> Path:
    """A fresh target folder for one dbt invocation, under the environment's own."""
    name = f"{op_name}-{run_id[:7]}-{uuid.uuid4().hex[:7]}"
    return Path(project.project_dir) / project.target_path / "runs" / name


def partial_parse_cache(project: DbtProject, settings: PlatformSettings, windowed: bool = False) -> Path:
    """Where the parse state of invocations with these connection settings is kept. Every run
    the platform makes has the same command-line vars (none: the daily window is in the
    environment), so the profile is the only key: switching between warehouses (the demo's,
    the benchmark's, PostgreSQL's) no longer costs a full parse each way.

    `windowed`: the daily facts' runs, whose dbt process has a partition window in its
    environment, keep a slot of their own. fct_lesson_events reads the window at parse time,
    so one shared slot made every switch between a daily run and another run re-parse that
    model and its YAML (1-2 s each way); in its own slot a daily run re-parses only when its
    window differs from the previous daily run's."""
    key = "|".join(f"{name}={settings.optional(name) or ''}"
                   for name in PROFILE_SETTINGS.get(settings.engine, ()))
    slot = f"{settings.dbt_target}|{key}" + ("|window" if windowed else "")
    digest = hashlib.sha1(slot.encode()).hexdigest()[:16]
    return Path(project.project_dir) / project.target_path / PARSE_STATES / f"{digest}.msgpack"


def seed_partial_parse(target: Path, *candidates: Path) -> None:
    """Seed a run folder with the first of `candidates` that exists: the kept state for this
    profile, then e.g. the profile's slot without a window (for a first daily run), then the
    one the manifest's preparation saved (`prepared_parse_state`: parsed with the settings
    the code location loaded with, usually the same profile)."""
    for source in candidates:
        if source.exists():
            target.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target / PARTIAL_PARSE)
                return
            except FileNotFoundError:  # pruned by another process meanwhile
                continue


def keep_partial_parse(target: Path, cache: Path, keep: int = KEPT_PARSE_STATES) -> None:
    """Give the state dbt saved in a run folder back to the cache (atomically: runs of other
    processes may read it at the same time), and drop the least recently used beyond `keep`."""
    saved = target / PARTIAL_PARSE
    if not saved.exists():
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{hashlib.sha1(str(target).encode()).hexdigest()[:8]}.tmp")
    shutil.copyfile(saved, tmp)
    os.replace(tmp, cache)
    states = []
    for path in cache.parent.glob("*.msgpack"):
        try:
            states.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    for _, path in sorted(states, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


def prune_run_folders(runs_dir: Path, keep: int = KEPT_RUN_FOLDERS,
                      min_age_s: float = RUN_FOLDER_MIN_AGE_S) -> list[Path]:
    """Remove the run folders beyond the `keep` most recently used, except those used in the
    last `min_age_s` seconds (a dbt command of another process may still be writing there:
    its dbt.log is). dagster-dbt makes one per dbt command and never removes it: a local
    instance (the UI, the demo, the tests) would otherwise grow by ~3 MB per command."""
    now = time.time()
    folders = []
    for folder in runs_dir.iterdir() if runs_dir.is_dir() else ():
        if not folder.is_dir():
            continue
        try:
            used = folder.stat().st_mtime
            log = folder / "dbt.log"
            if log.exists():
                used = max(used, log.stat().st_mtime)
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        folders.append((used, folder))
    removed = []
    for used, folder in sorted(folders, reverse=True)[keep:]:
        if now - used >= min_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _manifest_databases(manifest_path: Path) -> set[str]:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return set()
    return {node.get("database") for node in manifest.get("nodes", {}).values()
            if node.get("resource_type") == "model"}
