"""The local instance's SQLite storage (dagster.yaml -> platform_assets.instance_storage).

Real instances on real files: the repository's dagster.yaml in a temp DAGSTER_HOME, runs
executed by Dagster, and a second process on the same home while the first one keeps its
connections open (as the webserver, the daemon and run workers do).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest

from platform_assets.instance_storage import (
    MAX_CACHED_RUN_ENGINES,
    LocalSqliteEventLogStorage,
    LocalSqliteRunStorage,
    StorageSettingError,
)
from platform_assets.settings import REPO_ROOT


@dg.asset
def counted() -> int:
    return 1


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(home)}):
        yield home


def other_process(home: Path, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "DAGSTER_HOME": str(home)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_local_instance_uses_it_in_the_default_layout(home):
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.event_log_storage, LocalSqliteEventLogStorage)
        assert isinstance(instance.run_storage, LocalSqliteRunStorage)
        result = dg.materialize([counted], instance=instance)
        assert result.success
        run_id = result.run_id
        with instance.event_log_storage.index_connection() as conn:
            assert conn.exec_driver_sql("pragma synchronous").scalar() == 1  # NORMAL
            assert conn.exec_driver_sql("pragma journal_mode").scalar() == "wal"
    # Where `storage: sqlite` keeps them: an existing local instance keeps its history.
    assert (home / "history" / "runs.db").exists()
    assert (home / "history" / "runs" / "index.db").exists()
    assert (home / "history" / "runs" / f"{run_id}.db").exists()


def test_a_second_process_reads_and_writes_while_the_first_keeps_its_connections(home):
    with dg.DagsterInstance.get() as instance:
        first = dg.materialize([counted], instance=instance).run_id
        out = other_process(home, """
            import dagster as dg
            with dg.DagsterInstance.get() as instance:
                runs = instance.get_runs()
                print(len(runs), runs[0].run_id, runs[0].status.value)
                event = instance.get_latest_materialization_event(dg.AssetKey("counted"))
                print(event.run_id)
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key="written_elsewhere", metadata={"n": 7}))
        """).split()
        assert out == ["1", first, "SUCCESS", first]
        # The first process sees the other's write, and goes on writing.
        seen = instance.get_latest_materialization_event(dg.AssetKey("written_elsewhere"))
        assert seen.asset_materialization.metadata["n"].value == 7
        second = dg.materialize([counted], instance=instance).run_id
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")).run_id == second
        assert len(instance.get_runs()) == 2


def test_wipe_leaves_no_connection_on_a_removed_file(home):
    with dg.DagsterInstance.get() as instance:
        run_id = dg.materialize([counted], instance=instance).run_id
        assert instance.all_logs(run_id)
        instance.wipe()
        assert not (home / "history" / "runs" / f"{run_id}.db").exists()
        # A connection kept on the removed file would still return the wiped run's events.
        assert instance.all_logs(run_id) == []
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")) is None
        again = dg.materialize([counted], instance=instance).run_id
        assert instance.get_latest_materialization_event(dg.AssetKey("counted")).run_id == again


def test_engines_kept_are_bounded(home):
    storage = LocalSqliteEventLogStorage(str(home / "events"))
    try:
        for i in range(MAX_CACHED_RUN_ENGINES + 10):
            with storage.run_connection(f"run-{i}") as conn:
                conn.exec_driver_sql("select 1")
        kept = list(storage._engines)
        assert len(kept) == MAX_CACHED_RUN_ENGINES + 1
        assert "index" in kept and f"run-{MAX_CACHED_RUN_ENGINES + 9}" in kept and "run-0" not in kept
        # An evicted database is opened again when used.
        with storage.run_connection("run-0") as conn:
            assert conn.exec_driver_sql("select 1").scalar() == 1
    finally:
        storage.dispose()


def test_without_dagster_home_or_base_dir_the_error_names_them(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    for cls in (LocalSqliteEventLogStorage, LocalSqliteRunStorage):
        with pytest.raises(StorageSettingError, match="DAGSTER_HOME.*base_dir"):
            cls.from_config_value(None, {})
