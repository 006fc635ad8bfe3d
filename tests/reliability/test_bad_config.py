"""Bad configuration fails fast with ONE message naming the setting, never the password, and
creates nothing: a missing URL variable, a wrong password, an unreachable replica, a missing
warehouse folder (DuckDB); a wrong warehouse password and a wrong replica password (pg); an
unknown PLATFORM_ENV and a wrong password for `make demo`. The configuration is read when a
run starts (preflight), not when the code location loads: the platform below is built with
good settings and each case changes the process environment before the run, as an operator
editing .local/platform.env or the task definition would."""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

import dagster as dg
import psycopg
import pytest

from platform_assets.preflight import preflight
from platform_assets.settings import ConfigurationError, load_settings

from ..conftest import free_port
from ..platform.conftest import platform_environ, platform_under_test
from .faults import failure_messages, observe, run_assets

WRONG = "not-the-password-4711"


def _with_password(url: str, password: str, new: str) -> str:
    return url.replace(f":{password}@", f":{new}@")


def _environ_with(changes: dict[str, str | None]) -> dict[str, str]:
    """os.environ with these variables set, or removed where the value is None."""
    environ = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return environ


def _run_failing(put, changes: dict[str, str | None], runner=run_assets) -> tuple[str, float]:
    environ = _environ_with(changes)
    with mock.patch.dict(os.environ, environ, clear=True):
        started = time.monotonic()
        result = runner(put)
        elapsed = time.monotonic() - started
    assert not result.success
    messages = failure_messages(result)
    assert len(messages) == 1, messages
    return messages[0], elapsed


def _local_cases(pg_env) -> dict[str, tuple[dict[str, str | None], str]]:
    v = pg_env.values
    host_port = f"127.0.0.1:{pg_env.settings.replica_port}"
    dead_port = free_port()
    return {
        "missing REPLICA_URL": (
            {"REPLICA_URL": None}, "PLATFORM_ENV=local needs these variables, which are not set: REPLICA_URL"),
        "wrong password in REPLICA_URL": (
            {"REPLICA_URL": _with_password(v["REPLICA_URL"], v["REPLICA_PASSWORD"], WRONG), "REPLICA_PASSWORD": WRONG},
            f"REPLICA_URL: password authentication failed for user federation_ro at {host_port}"),
        "wrong REPLICA_PASSWORD only": (
            {"REPLICA_PASSWORD": WRONG},
            f"REPLICA_PASSWORD: password authentication failed for user federation_ro at {host_port}"),
        "unreachable replica": (
            {"REPLICA_URL": v["REPLICA_URL"].replace(f":{pg_env.settings.replica_port}/", f":{dead_port}/"),
             "REPLICA_PORT": str(dead_port)},
            f"REPLICA_URL: connection refused (is the server running and listening there?) at 127.0.0.1:{dead_port}"),
    }


# Cases also run through a Dagster run (the others through the preflight alone: the run adds
# only the instance's bookkeeping, seconds of SQLite writes, to the same check).
THROUGH_DAGSTER = ("missing REPLICA_URL", "wrong password in REPLICA_URL", "unreachable replica")


def _preflight_message(changes: dict[str, str | None], env: str) -> tuple[str, float]:
    environ = _environ_with(changes)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as failed:
        preflight(load_settings({**environ, "PLATFORM_ENV": env}))
    return str(failed.value), time.monotonic() - started


def test_local_bad_configuration_fails_fast_and_creates_nothing(pg_env, tmp_path):
    with platform_under_test(pg_env, tmp_path, "local") as put:
        duckdb_path = put.environ["DUCKDB_PATH"]
        cases = _local_cases(pg_env)
        cases["missing warehouse folder"] = (
            {"DUCKDB_PATH": str(tmp_path / "no-such-folder" / "warehouse.duckdb")},
            f"DUCKDB_PATH: folder {tmp_path / 'no-such-folder'} does not exist (the warehouse file goes there)")
        print()
        for name, (changes, expected) in cases.items():
            message, elapsed = _preflight_message(changes, "local")
            line = f"  {name:<28} preflight failed in {elapsed:5.3f}s"
            if name == "missing REPLICA_URL":
                # The resources take their values from EnvVar: Dagster refuses the run, naming it.
                with mock.patch.dict(os.environ, _environ_with(changes), clear=True), pytest.raises(
                        dg.DagsterInvalidConfigError, match='environment variable "REPLICA_URL" which is not set'):
                    run_assets(put)
                line += ", its run refused by Dagster"
            elif name in THROUGH_DAGSTER:
                run_message, run_elapsed = _run_failing(put, changes)
                assert run_message == f"preflight: {message}"
                line += f", its run in {run_elapsed:4.1f}s"
            print(f"{line}: {message}")
            assert message == expected
            assert WRONG not in message and pg_env.values["REPLICA_PASSWORD"] not in message
            assert not os.path.exists(duckdb_path), "nothing may be created"
            assert not (tmp_path / "no-such-folder").exists()
        # An observation with a wrong password: the same one message, from the observation.
        v = pg_env.values
        message, elapsed = _run_failing(
            put, {"REPLICA_URL": _with_password(v["REPLICA_URL"], v["REPLICA_PASSWORD"], WRONG)}, runner=observe)
        print(f"  {'observation, wrong password':<28} its run failed in {elapsed:4.1f}s: {message}")
        assert message == (f"REPLICA_URL: password authentication failed for user federation_ro"
                           f" at 127.0.0.1:{pg_env.settings.replica_port}")


def _warehouse_objects(pg_env) -> set[tuple[str, str, str]]:
    with psycopg.connect(pg_env.values["WAREHOUSE_PG_URL"]) as conn:
        rows = conn.execute(
            "select n.nspname, c.relname, c.relkind::text from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
            " union all select nspname, '', 'schema' from pg_namespace"
            " union all select 'server', srvname, array_to_string(srvoptions, ',') from pg_foreign_server"
        ).fetchall()
    return set(rows)


def test_pg_bad_configuration_fails_fast_and_creates_nothing(pg_env, tmp_path):
    v = pg_env.values
    with platform_under_test(pg_env, tmp_path, "pg") as put:
        before = _warehouse_objects(pg_env)
        host_port = f"127.0.0.1:{pg_env.settings.primary_port}"
        cases = {
            "wrong WAREHOUSE_PG_PASSWORD": (
                {"WAREHOUSE_PG_PASSWORD": WRONG},
                f"WAREHOUSE_PG_PASSWORD: password authentication failed for user warehouse at {host_port}"),
            "wrong REPLICA_PASSWORD": (
                {"REPLICA_URL": _with_password(v["REPLICA_URL"], v["REPLICA_PASSWORD"], WRONG),
                 "REPLICA_PASSWORD": WRONG},
                f"REPLICA_URL: password authentication failed for user federation_ro"
                f" at 127.0.0.1:{pg_env.settings.replica_port}"),
        }
        print()
        for name, (changes, expected) in cases.items():
            message, elapsed = _preflight_message(changes, "pg")
            line = f"  pg: {name:<28} preflight failed in {elapsed:5.3f}s"
            if name == "wrong REPLICA_PASSWORD":
                run_message, run_elapsed = _run_failing(put, changes)
                assert run_message == f"preflight: {message}"
                line += f", its run in {run_elapsed:4.1f}s"
            print(f"{line}: {message}")
            assert message == expected
            assert WRONG not in message
        after = _warehouse_objects(pg_env)
        assert after == before, f"created: {sorted(after - before)}; dropped: {sorted(before - after)}"
        print(f"  pg warehouse: {len(before)} objects before and after")


@pytest.mark.parametrize("case", ["unknown PLATFORM_ENV", "wrong password"])
def test_demo_refuses_bad_configuration_in_one_line(pg_env, tmp_path, capsys, case):
    """`make demo` (localenv.demo.main, run in this process to save the interpreter start)."""
    from localenv import demo

    environ = {**os.environ, **platform_environ(pg_env, tmp_path, "local"), "DAGSTER_HOME": str(tmp_path / "dagster")}
    (tmp_path / "dagster").mkdir()
    if case == "unknown PLATFORM_ENV":
        environ["PLATFORM_ENV"] = "staging"
        expected = "demo not started: PLATFORM_ENV='staging' is not a known environment; valid: local, pg, prod"
    else:
        v = pg_env.values
        environ["REPLICA_URL"] = _with_password(v["REPLICA_URL"], v["REPLICA_PASSWORD"], WRONG)
        expected = ("demo not started: REPLICA_URL: password authentication failed for user federation_ro"
                    f" at 127.0.0.1:{pg_env.settings.replica_port}")
    capsys.readouterr()
    # The code location module is built from the environment when first imported: import it
    # afresh here, and leave no copy built from these settings behind.
    sys.modules.pop("platform_assets.definitions", None)
    try:
        with mock.patch.dict(os.environ, environ, clear=True):
            started = time.monotonic()
            code = demo.main()
            elapsed = time.monotonic() - started
    finally:
        sys.modules.pop("platform_assets.definitions", None)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    with capsys.disabled():
        print(f"\n  demo, {case}: exit {code} after {elapsed:.1f}s: {lines}")
    assert code == 2
    assert lines == [expected] and out == ""
    assert WRONG not in err
    assert not os.path.exists(environ["DUCKDB_PATH"])
