"""How `make test` hands tests to its pytest-xdist workers, and where their scratch data goes
(tests/conftest.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .conftest import (
    LONGEST_FIRST,
    SHARED_FIXTURE_GROUPS,
    SharedFixtureScheduling,
    memory_tmpdir,
    pytest_xdist_make_scheduler,
    schedule_rank,
    scheduling_group,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_shared_fixture_group_names_files_that_exist():
    # A renamed or moved file would silently leave its group and build the fixture again.
    for prefix in SHARED_FIXTURE_GROUPS:
        assert (ROOT / prefix).exists(), prefix


def test_longest_units_are_named_by_existing_groups_and_go_first():
    groups = set(SHARED_FIXTURE_GROUPS.values())
    for unit in LONGEST_FIRST:
        assert unit in groups or (ROOT / unit).is_file(), unit
    assert schedule_rank("tests/platform/test_churn_duckdb.py::t") < schedule_rank("tests/dbt/test_dbt_project.py::x") \
        < schedule_rank("tests/deploy/test_workflow.py::y")
    assert schedule_rank("tests/deploy/test_workflow.py::y") == schedule_rank("tests/local/test_environment.py::z")


def test_files_sharing_a_fixture_are_one_unit_and_other_files_their_own():
    scenario = {
        scheduling_group("tests/dbt/test_dbt_project.py::test_builds_pass_with_every_kind_of_test"),
        scheduling_group("tests/dbt/test_redshift_readiness.py::test_x"),
        scheduling_group("tests/reliability/test_zero_downtime.py::test_y[pg]"),
        scheduling_group("tests/reliability/test_killed_run.py::test_kill_9_mid_table_build_on_duckdb"),
    }
    assert scenario == {"dbt-scenario"}
    assert scheduling_group("tests/platform/test_ui_browser.py::t") == "webserver"
    assert scheduling_group("tests/platform/test_graph.py::u") == "webserver"
    assert scheduling_group("tests/bi/test_reads_during_refresh.py::t") == "bi-stack" \
        == scheduling_group("tests/bi/test_embedded_portal.py::u") == scheduling_group("tests/bi/test_copy_asset.py::v")
    assert schedule_rank("tests/bi/test_embedded_portal.py::u") == 0  # the Superset start, on one worker, first
    assert scheduling_group("tests/platform/test_pipeline.py::a[local]") == "tests/platform/test_pipeline.py"
    assert scheduling_group("tests/platform/test_pipeline.py::b[pg]") == "tests/platform/test_pipeline.py"
    assert scheduling_group("tests/reliability/test_lag_guard.py::c") == "tests/reliability/test_lag_guard.py"


def test_loadgroup_uses_the_shared_fixture_scheduler(pytestconfig, monkeypatch):
    # What xdist's controller asks for `make test`'s --dist loadgroup (inside a worker the
    # options are reset to no distribution, so they are set here as the controller has them).
    monkeypatch.setattr(pytestconfig.option, "dist", "loadgroup")
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])
    monkeypatch.setattr(pytestconfig.option, "loadscopereorder", True)
    scheduler = pytest_xdist_make_scheduler(pytestconfig, None)
    assert isinstance(scheduler, SharedFixtureScheduling)
    assert pytestconfig.option.loadscopereorder is False
    assert scheduler._split_scope("tests/dbt/test_dbt_project.py::x") == scheduler._split_scope(
        "tests/reliability/test_killed_run.py::y[pg]")
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    assert pytest_xdist_make_scheduler(pytestconfig, None) is None


def test_scratch_data_goes_to_a_tmpfs_only_with_room(tmp_path):
    # tmp_path itself: on the tmpfs when the session chose it, else on disk
    mounts = Path("/proc/mounts").read_text()
    assert memory_tmpdir(Path("/proc/self")) is None  # not a tmpfs
    assert memory_tmpdir(tmp_path / "absent") is None  # not a mount point at all
    if " /dev/shm tmpfs " not in mounts:
        return
    assert memory_tmpdir(Path("/dev/shm"), min_free=2**62) is None  # no room
    folder = memory_tmpdir(Path("/dev/shm"), min_free=1)
    assert folder is not None and folder.parent == Path("/dev/shm")
    assert folder.stat().st_mode & 0o777 == 0o755
    if os.environ.get("TMPDIR") == str(folder):  # the session's choice reached this worker
        assert Path(tempfile.gettempdir()) == folder and str(tmp_path).startswith(str(folder))
