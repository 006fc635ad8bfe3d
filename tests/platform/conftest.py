"""Fixtures that build the platform's Definitions against the session's primary + replica,
for one warehouse engine at a time, with a real Dagster instance in a temp folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from unittest import mock

import dagster as dg

from platform_assets.assembly import Platform, build_platform
from platform_assets.settings import load_settings

from ..conftest import TEST_DAYS

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class PlatformUnderTest:
    platform: Platform
    instance: dg.DagsterInstance
    environ: dict[str, str]
    dagster_home: Path

    @property
    def defs(self) -> dg.Definitions:
        return self.platform.defs


def platform_environ(pg_env, folder: Path, env: str) -> dict[str, str]:
    """The process environment a deployed platform would have, pointing at the test servers."""
    return {
        **pg_env.values,
        "PLATFORM_ENV": env,
        # never the developer's .local/platform.env
        "PLATFORM_ENV_FILE": str(folder / "no-platform.env"),
        "DUCKDB_PATH": str(folder / "warehouse.duckdb"),
        # The test data spans TEST_DAYS: fewer partitions than the default start keeps the
        # first full build (every partition, one run) small.
        "FACT_PARTITIONS_START": (date.today() - timedelta(days=TEST_DAYS + 5)).isoformat(),
    }


@contextmanager
def platform_under_test(pg_env, folder: Path, env: str) -> Iterator[PlatformUnderTest]:
    environ = platform_environ(pg_env, folder, env)
    home = folder / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with mock.patch.dict(os.environ, {**environ, "DAGSTER_HOME": str(home)}):
        platform = build_platform(load_settings())
        with dg.DagsterInstance.get() as instance:
            yield PlatformUnderTest(platform=platform, instance=instance, environ=dict(os.environ),
                                    dagster_home=home)
