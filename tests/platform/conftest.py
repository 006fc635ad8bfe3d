"""Fixtures that build the platform's Definitions against the session's primary + replica,
for one warehouse engine at a time, with a real Dagster instance in a temp folder (or Dagster's
in-memory one, for the churn harness)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest

from platform_assets.assembly import Platform, build_platform
from platform_assets.settings import load_settings

from ..conftest import TEST_DAYS, free_port

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


def platform_environ(pg_env, folder: Path, env: str, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The process environment a deployed platform would have, pointing at the test servers
    (`overrides`: settings a test changes, e.g. REPLICA_SCHEMA)."""
    return {
        **pg_env.values,
        "PLATFORM_ENV": env,
        # never the developer's .local/platform.env
        "PLATFORM_ENV_FILE": str(folder / "no-platform.env"),
        "DUCKDB_PATH": str(folder / "warehouse.duckdb"),
        # customer exports into the test's folder (the default is under LOCAL_DIR)
        "EXPORT_URI": str(folder / "exports"),
        # The test data spans TEST_DAYS: fewer partitions than the default start keeps the
        # first full build (every partition, one run) small.
        "FACT_PARTITIONS_START": (date.today() - timedelta(days=TEST_DAYS + 5)).isoformat(),
        **(overrides or {}),
    }


@contextmanager
def platform_under_test(pg_env, folder: Path, env: str, overrides: dict[str, str] | None = None,
                        in_memory: bool = False) -> Iterator[PlatformUnderTest]:
    """The platform's Definitions and a Dagster instance: the local one (dagster.yaml, SQLite
    storage in the folder), or with `in_memory` Dagster's ephemeral instance, for a test whose
    claim is the data and whose many runs would spend a sixth of their time in SQLite writes."""
    environ = platform_environ(pg_env, folder, env, overrides)
    home = folder / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with mock.patch.dict(os.environ, {**environ, "DAGSTER_HOME": str(home)}):
        platform = build_platform(load_settings())
        with (dg.DagsterInstance.ephemeral() if in_memory else dg.DagsterInstance.get()) as instance:
            yield PlatformUnderTest(platform=platform, instance=instance, environ=dict(os.environ),
                                    dagster_home=home)


@dataclass
class Webserver:
    """A running `dagster-webserver` serving the platform's code location (PLATFORM_ENV=local)."""

    url: str
    log: Path
    proc: subprocess.Popen

    def graphql(self, query: str, timeout: float = 30) -> dict:
        request = urllib.request.Request(
            f"{self.url}/graphql", data=json.dumps({"query": query}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="session")
def platform_webserver(pg_env, tmp_path_factory) -> Iterator[Webserver]:
    """One webserver start for every test that talks to the UI (GraphQL, the browser test).
    Its own Dagster home and warehouse file in a temp folder; ready once the code location
    has loaded and GraphQL lists the assets."""
    folder = tmp_path_factory.mktemp("webserver")
    home = folder / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    environ = {**os.environ, **platform_environ(pg_env, folder, "local"), "DAGSTER_HOME": str(home)}
    port = free_port()
    log = folder / "webserver.log"
    with log.open("wb") as out:  # a file, not a pipe: nobody has to drain it while tests run
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "platform_assets.definitions",
             "-h", "127.0.0.1", "-p", str(port)],
            env=environ, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    server = Webserver(url=f"http://127.0.0.1:{port}", log=log, proc=proc)
    try:
        deadline = time.monotonic() + 180
        body: dict | None = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"dagster-webserver exited ({proc.returncode}):\n{server.log_tail()}"
            try:
                body = server.graphql("{ assetNodes { id } }", timeout=10)
                if (body.get("data") or {}).get("assetNodes"):
                    break
            except OSError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"dagster-webserver not serving assets after 180 s: {body}\n{server.log_tail()}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
