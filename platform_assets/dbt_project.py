"""The dbt project as Dagster sees it, for one resolved environment.

One resolved environment feeds both the parsed manifest and the dbt resource, so the graph
that is parsed is the graph that runs. Each environment parses into its own target folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from dagster_dbt import DbtProject

from .settings import DBT_PROJECT_DIR, ConfigurationError, PlatformSettings, load_settings


def dbt_project_for(settings: PlatformSettings, prepare: bool = True) -> DbtProject:
    project = DbtProject(
        project_dir=DBT_PROJECT_DIR,
        profiles_dir=DBT_PROJECT_DIR,
        target=settings.dbt_target,
        target_path=f"target/{settings.env}",
    )
    if not prepare:
        return project
    # Locally the manifest is re-parsed whenever the dbt project's files are not the ones it
    # was parsed from, so the graph Dagster loads is always the one on disk. prod expects the
    # manifest the image build parsed (`dagster-dbt project prepare-and-package`).
    if settings.env == "prod":
        return project
    version = project_version(project)
    if manifest_is_stale(project, warehouse_database(settings), version):
        settings.export_for_subprocesses()
        # A full parse: dbt's partial parse across changed files can drop nodes (see
        # parse_state_candidates), and this manifest is the graph Dagster loads.
        prepared_parse_state(project).unlink(missing_ok=True)
        project.preparer.prepare(project)
        _prepared_version_path(project).write_text(version)
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


def manifest_is_stale(project: DbtProject, database: str | None = None, version: str | None = None) -> bool:
    """No manifest; or it was parsed from another version of the project's files (a file
    edited, added or removed since: `project_version`, recorded by its preparation); or for
    another warehouse database (e.g. another WAREHOUSE_PG_DB: dagster-dbt's metadata queries
    would name the old one, which PostgreSQL refuses as a cross-database reference)."""
    if not project.manifest_path.exists():
        return True
    if database is not None and database not in _manifest_databases(project.manifest_path):
        return True
    return prepared_version(project) != (version or project_version(project))


def _project_files(root: Path) -> list[Path]:
    """The files dbt parses the project from (and its profile)."""
    files = [path for folder in ("models", "macros", "snapshots", "tests", "seeds", "analyses")
             for path in sorted((root / folder).rglob("*")) if path.is_file()]
    return files + [root / name for name in ("dbt_project.yml", "profiles.yml", "packages.yml")
                    if (root / name).exists()]


def project_version(project: DbtProject) -> str:
    """Which version of the project's files is on disk: path, size and modification time of
    each (changes when any file is edited, added or removed)."""
    root = Path(project.project_dir)
    digest = hashlib.sha1()
    for path in _project_files(root):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        digest.update(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


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


def _prepared_version_path(project: DbtProject) -> Path:
    return Path(project.project_dir) / project.target_path / "partial_parse.version"


def prepared_version(project: DbtProject) -> str | None:
    """The project version the prepared parse state was parsed from (None: unknown)."""
    try:
        return _prepared_version_path(project).read_text().strip() or None
    except FileNotFoundError:
        return None


def parse_state_candidates(project: DbtProject, settings: PlatformSettings,
                           windowed: bool = False) -> tuple[Path, list[Path]]:
    """Where a run's parse state is kept (`partial_parse_cache` for this profile and the
    project version on disk now), and the states to seed the run with, in order: that slot,
    the profile's slot without a window (a first daily run), and the preparation's state if
    it was parsed from the same version.

    A state saved from other versions of the project's files is never used: dbt would
    partially re-parse the changed files, and dbt-core 1.11's partial parsing can drop a
    YAML-defined snapshot when a macro file changes (seen here: snp_app__subscriptions
    and its tests gone from the run's manifest after an edit of macros/tests/on_replica.sql,
    with the run "successful"; dbt-core issues 10903 and 15785 are of the same kind). A run
    after an edit parses the project in full once (about 10 s), and its state is then kept
    for the runs after it."""
    version = project_version(project)
    cache = partial_parse_cache(project, settings, windowed=windowed, version=version)
    candidates = [cache]
    if windowed:
        candidates.append(partial_parse_cache(project, settings, version=version))
    if prepared_version(project) == version:
        candidates.append(prepared_parse_state(project))
    return cache, candidates


def run_target_path(project: DbtProject, op_name: str, run_id: str) -> Path:
    """A fresh target folder for one dbt invocation, under the environment's own."""
    name = f"{op_name}-{run_id[:7]}-{uuid.uuid4().hex[:7]}"
    return Path(project.project_dir) / project.target_path / "runs" / name


def partial_parse_cache(project: DbtProject, settings: PlatformSettings, windowed: bool = False,
                        version: str | None = None) -> Path:
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
    # and per version of the project's files (parse_state_candidates)
    slot += f"|{version or project_version(project)}"
    digest = hashlib.sha1(slot.encode()).hexdigest()[:16]
    return Path(project.project_dir) / project.target_path / PARSE_STATES / f"{digest}.msgpack"


def seed_partial_parse(target: Path, *candidates: Path) -> Path | None:
    """Seed a run folder with the first of `candidates` that exists: the kept state for this
    profile, then e.g. the profile's slot without a window (for a first daily run), then the
    one the manifest's preparation saved (`prepared_parse_state`: parsed with the settings
    the code location loaded with, usually the same profile). Returns the state used."""
    for source in candidates:
        if source.exists():
            target.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target / PARTIAL_PARSE)
                return source
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
    return None


def warm_parse_state(project: DbtProject, settings: PlatformSettings) -> bool:
    """Make sure the runs with these settings find a parse state of their own for the project
    version on disk (`partial_parse_cache`): if there is none, `dbt parse` with them, seeded
    from the preparation's state (a partial parse when it was parsed with the same profile,
    a full one otherwise), and keep what it saved there. Returns whether it parsed. Otherwise
    the first run with a profile the manifest was not prepared with (another DuckDB file,
    another PostgreSQL server) parses the project in full inside its first dbt command."""
    from dagster_dbt import DbtCliResource

    from .dbt_warm import real_dbt

    version = project_version(project)
    cache = partial_parse_cache(project, settings, version=version)
    if cache.exists():
        return False
    settings.export_for_subprocesses()
    target = run_target_path(project, "parse", uuid.uuid4().hex)
    if prepared_version(project) == version:
        seed_partial_parse(target, prepared_parse_state(project))
    try:
        DbtCliResource(project_dir=project, dbt_executable=real_dbt()).cli(
            ["parse", "--quiet"], target_path=target).wait()
        keep_partial_parse(target, cache)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return True


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


def main() -> int:
    """`python -m platform_assets.dbt_project`: parse the manifest of the environment this
    process's settings describe (PLATFORM_ENV and the rest, as for the definitions) if it is
    stale, as loading the definitions would first, and the parse state its runs start from
    if they have none yet (`warm_parse_state`). A caller can so parse several environments
    side by side before loading or running any of them (the benchmark does)."""
    started = time.perf_counter()
    try:
        settings = load_settings()
        project = dbt_project_for(settings, prepare=False)
        stale = settings.env != "prod" and manifest_is_stale(project, warehouse_database(settings))
        dbt_project_for(settings)
        warmed = settings.env != "prod" and warm_parse_state(project, settings)
    except ConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "parsed" if stale else "already current"
    state = "parsed" if warmed else "already kept"
    print(f"{settings.env}: {project.manifest_path} {what}, the runs' parse state for these settings "
          f"{state} ({time.perf_counter() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
