"""How `make test` hands tests to its pytest-xdist workers (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from .conftest import SHARED_FIXTURE_GROUPS, SharedFixtureScheduling, pytest_xdist_make_scheduler, scheduling_group

ROOT = Path(__file__).resolve().parents[1]


def test_every_shared_fixture_group_names_files_that_exist():
    # A renamed or moved file would silently leave its group and build the fixture again.
    for prefix in SHARED_FIXTURE_GROUPS:
        assert (ROOT / prefix).exists(), prefix


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
    assert scheduling_group("tests/platform/test_pipeline.py::a[local]") == "tests/platform/test_pipeline.py"
    assert scheduling_group("tests/platform/test_pipeline.py::b[pg]") == "tests/platform/test_pipeline.py"
    assert scheduling_group("tests/reliability/test_lag_guard.py::c") == "tests/reliability/test_lag_guard.py"


def test_loadgroup_uses_the_shared_fixture_scheduler(pytestconfig, monkeypatch):
    # What xdist's controller asks for `make test`'s --dist loadgroup (inside a worker the
    # options are reset to no distribution, so they are set here as the controller has them).
    monkeypatch.setattr(pytestconfig.option, "dist", "loadgroup")
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])
    scheduler = pytest_xdist_make_scheduler(pytestconfig, None)
    assert isinstance(scheduler, SharedFixtureScheduling)
    assert scheduler._split_scope("tests/dbt/test_dbt_project.py::x") == scheduler._split_scope(
        "tests/reliability/test_killed_run.py::y[pg]")
    monkeypatch.setattr(pytestconfig.option, "dist", "load")
    assert pytest_xdist_make_scheduler(pytestconfig, None) is None
