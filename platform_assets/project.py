"""Module-level DbtProject of the resolved environment, for
`dagster-dbt project prepare-and-package --file platform_assets/project.py` (image build)."""

from __future__ import annotations

from platform_assets.dbt_project import project_for
from platform_assets.settings import load_settings

dbt_project = project_for(load_settings())
