"""The dbt project as Dagster sees it, for one resolved environment.

One resolved environment feeds both the parsed manifest and the dbt resource, so the graph
that is parsed is the graph that runs. Each environment parses into its own target folder.
"""

from __future__ import annotations

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
    if settings.env != "prod" and manifest_is_stale(project):
        settings.export_for_subprocesses()
        project.preparer.prepare(project)
    return project


def manifest_is_stale(project: DbtProject) -> bool:
    if not project.manifest_path.exists():
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
