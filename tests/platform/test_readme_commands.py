"""Every shell command in the README works as written.

The README's ```bash blocks are parsed into commands; COMMANDS below says for each one whether
this test runs it or why not, and the first test fails when the two differ (a command added,
changed or removed in the README without this list following). The second test runs the
blocks, unchanged, as bash scripts in a demo-like clone: `.local/` holding platform.env, the
DuckDB warehouse built by `make demo`'s own commands (`localenv summary` and `localenv.demo`;
`make up` is the session's servers here), the Dagster instance under `.local/dagster`, and
`make ui`'s `dagster dev` serving the runs the commands submit (its sensors still tick: a run
one started would show in the checks of the runs made, live_dagster.instance_config). The
companies go up to id 75, as in the demo data, which the exports command names. The demo's
output is checked too: short, its row counts the warehouse's, and no asset "Unsynced" after
a second run with no change in the source.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import pytest
import yaml

from platform_assets.bi import COPY_KEY as BI_COPY_KEY

from ..conftest import TEST_DAYS
from ..reliability.live_dagster import LiveDagster, instance_config, live_dagster
from .conftest import REPO_ROOT, platform_environ

README = REPO_ROOT / "README.md"

RUN = "run"
# README command (continuation lines joined, spaces collapsed) -> RUN, or why it is not run here.
COMMANDS = {
    "make demo": "builds this test's environment (its commands but `make up`: the session's servers)",
    "make test": "the suite this test belongs to",
    ".venv/bin/dagster definitions validate -m platform_assets.definitions": RUN,
    "export DAGSTER_HOME=$PWD/.local/dagster": RUN,
    ".venv/bin/dagster asset materialize -m platform_assets.definitions --select "
    "marts/fct_lesson_events,marts/fct_daily_learning_activity --partition-range 2026-11-01...2026-11-07": RUN,
    ".venv/bin/dagster job launch -w workspace.yaml -j daily_facts --tags "
    """'{"dagster/asset_partition_range_start": "2026-11-01", "dagster/asset_partition_range_end": "2026-11-07"}'""":
        RUN,
    ".venv/bin/dagster job backfill -w workspace.yaml -j daily_facts --from 2026-11-08 --to 2026-11-09 --noprompt":
        RUN,
    ".venv/bin/dagster asset materialize -m platform_assets.definitions --select "
    "exports/company_training_report --partition 7": RUN,
    ".venv/bin/dagster job launch -w workspace.yaml -j customer_exports --tags "
    """'{"dagster/asset_partition_range_start": "1", "dagster/asset_partition_range_end": "75"}'""": RUN,
}
DEMO_COMPANIES = 75


def readme_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def block_commands(block: str) -> list[str]:
    """The commands of a block: comments dropped, continuation lines joined."""
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not line and not current:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        commands += [" ".join(part.split()) for part in current.split(";") if part.strip()]
        current = ""
    return commands


def test_readme_commands_are_the_listed_ones():
    found = [c for block in readme_blocks(README.read_text()) for c in block_commands(block)]
    assert set(found) == set(COMMANDS), {
        "in the README, not in COMMANDS": sorted(set(found) - set(COMMANDS)),
        "in COMMANDS, no longer in the README": sorted(set(COMMANDS) - set(found)),
    }


@pytest.mark.slow
def test_readme_group_urls_name_the_location_and_real_groups(readme_env):
    live: LiveDagster = readme_env["live"]
    urls = re.findall(r"http://127\.0\.0\.1:3000(/\S*[\w/])", README.read_text())
    location = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"][
        "location_name"]
    groups = {g["groupName"] for g in live.graphql(
        "{ assetNodes { groupName } }")["assetNodes"]}
    group_paths = [u for u in urls if "asset-groups" in u]
    assert group_paths
    for path in group_paths:
        assert re.fullmatch(rf"/locations/{location}/asset-groups/(\w+)", path), path
        assert path.rsplit("/", 1)[1] in groups, path


# -- the demo-like clone --------------------------------------------------------------------
def _ensure_companies(pg_env, up_to: int) -> None:
    with pg_env.primary() as conn:
        count = conn.execute("select coalesce(max(company_id), 0) from app.companies").fetchone()[0]
        if count < up_to:
            conn.execute(
                "insert into app.companies (name, plan, seats, region, created_at, updated_at)"
                " select 'Company ' || g, 'team', 10, 'eu-west', now(), now() from generate_series(%s::int, %s::int) g",
                (count + 1, up_to))
    pg_env.wait_for_replay()


@pytest.fixture(scope="module")
def readme_env(pg_env, tmp_path_factory) -> Iterator[dict]:
    clone = tmp_path_factory.mktemp("clone")
    local = clone / ".local"
    (clone / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (clone / "workspace.yaml").symlink_to(REPO_ROOT / "workspace.yaml")
    _ensure_companies(pg_env, DEMO_COMPANIES)
    # Partitions from the first day the README's commands name, or the data's first day if
    # earlier: the demo default's year of empty days would only add to every run's plan and events.
    start = min(min(re.findall(r"\d{4}-\d{2}-\d{2}", " ".join(COMMANDS))),
                (date.today() - timedelta(days=TEST_DAYS + 5)).isoformat())
    overrides = {"FACT_PARTITIONS_START": start, "SOURCE_OBSERVE_CRON": "0 0 1 1 *",
                 "LOCAL_DIR": str(local)}
    environ = platform_environ(pg_env, local, "local", overrides)
    local.mkdir()
    (local / "platform.env").write_text(
        "".join(f"{k}={v}\n" for k, v in environ.items() if k != "PLATFORM_ENV_FILE"))
    (local / "dagster").mkdir()
    (local / "dagster" / "dagster.yaml").write_text(yaml.safe_dump(instance_config()))
    first = run_demo(clone)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    with live_dagster(pg_env, local, instance_config(), overrides, cwd=clone) as live:
        yield {"clone": clone, "local": local, "live": live, "first_demo": first.stdout,
               "first_demo_stderr": first.stderr}


def run_demo(clone: Path) -> subprocess.CompletedProcess:
    """`make demo` after its `make up`: the replica's summary, then the demo, in the clone's shell."""
    env = {**shell_environ(clone), "DAGSTER_HOME": str(clone / ".local" / "dagster"),
           "DEMO_STARTED": str(time.time()), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"{sys.executable} -m localenv summary && {sys.executable} -m localenv.demo"],
                          cwd=clone, env=env, capture_output=True, text=True, timeout=900)


# `make up`'s lines, which this environment (the session's servers) does not print: a first
# one loads the data (two lines), a later one finds the servers up (one line).
UP_LINES_FIRST, UP_LINES_AGAIN = 2, 1


def _warehouse_counts(local: Path, names: list[str]) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(str(local / "warehouse.duckdb"), read_only=True)
    try:
        return {n: con.execute(f"select count(*) from {n}").fetchone()[0] for n in names}
    finally:
        con.close()


def _summary_counts(output: str) -> dict[str, int]:
    """The demo summary's row counts, by relation (schema.name)."""
    block = output.split("rows in the warehouse (count(*) now):", 1)[1]
    counts = {}
    for line in block.splitlines()[1:]:
        found = re.findall(r"((?:marts|reporting)\.\w+)\s+([\d,]+)", line)
        if not found:
            break
        counts.update({name: int(n.replace(",", "")) for name, n in found})
    return counts


@pytest.mark.slow
def test_demo_output_is_short_and_counts_the_warehouse(readme_env):
    first = readme_env["first_demo"]
    first_lines = first.splitlines()
    assert len(first_lines) + UP_LINES_FIRST <= 60, first
    counts = _summary_counts(first)
    assert len(counts) == 11, first
    assert counts == _warehouse_counts(readme_env["local"], list(counts)), first
    assert "nothing needs attention" in first, first
    log = re.search(r"logs of this demo: (\S+)", first)[1]
    # dbt's output is in the log file, not on the terminal; no "not selected" check warnings
    assert "Running with dbt=" in Path(log).read_text() and "Running with dbt=" not in first
    assert "was yielded which is not selected" not in Path(log).read_text()
    assert readme_env["first_demo_stderr"].strip() == "", readme_env["first_demo_stderr"][-3000:]

    second = run_demo(readme_env["clone"])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # Observing unchanged sources again leaves every asset in sync (nothing "Unsynced" in the UI).
    nodes = readme_env["live"].graphql(
        "{ assetNodes { assetKey { path } isMaterializable staleStatus "
        "staleCauses { key { path } reason } } }")["assetNodes"]
    stale = {"/".join(n["assetKey"]["path"]): n["staleCauses"] for n in nodes
             if n["isMaterializable"] and n["staleStatus"] != "FRESH"}
    assert not stale, stale
    assert len(second.stdout.splitlines()) + UP_LINES_AGAIN <= 25, second.stdout
    assert second.stderr.strip() == "", second.stderr[-3000:]
    assert "0 sources changed" in second.stdout and "no day differs" in second.stdout, second.stdout
    assert _summary_counts(second.stdout) == _warehouse_counts(readme_env["local"], list(counts))
    print(f"\n  make demo: first run {len(first_lines) + UP_LINES_FIRST} lines, "
          f"second {len(second.stdout.splitlines()) + UP_LINES_AGAIN}")


def shell_environ(clone: Path) -> dict[str, str]:
    """A shell of the clone: none of the platform's variables, no DAGSTER_HOME. LOCAL_DIR stands
    for the clone's own `.local` (the code location's default is the .local beside its files)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DAGSTER_HOME", "PLATFORM_ENV_FILE", "PLATFORM_ENV") and not k.startswith(
               ("REPLICA_", "PRIMARY_", "WAREHOUSE_", "DUCKDB_", "EXPORT_", "DBT_ENV_SECRET_"))}
    env["LOCAL_DIR"] = str(clone / ".local")
    return env


def run_block(clone: Path, block: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=clone, env=shell_environ(clone),
                          capture_output=True, text=True, timeout=timeout)


def _wait_runs_done(live: LiveDagster, run_ids: set[str], timeout: float = 1200) -> dict[str, dg.DagsterRunStatus]:
    deadline = time.monotonic() + timeout
    while True:
        with live.instance() as instance:
            statuses = {r: instance.get_run_by_id(r).status for r in run_ids}
        if all(s in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
               for s in statuses.values()):
            return statuses
        assert time.monotonic() < deadline, f"runs not finished after {timeout}s: {statuses}\n{live.log_tail()}"
        time.sleep(2)


def _run_ids(live: LiveDagster) -> set[str]:
    """The runs so far, less the BI copy's, which its automation sensor launches in the live
    instance after any run of the daily facts, whenever its tick comes."""
    with live.instance() as instance:
        return {r.dagster_run.run_id for r in instance.get_run_records()
                if r.dagster_run.asset_selection != {BI_COPY_KEY}}


def _block_with(text: str, command_start: str) -> str:
    (block,) = [b for b in readme_blocks(text) if any(c.startswith(command_start) for c in block_commands(b))]
    return block


@pytest.mark.slow
def test_validate_needs_no_dagster_home(readme_env):
    block = _block_with(README.read_text(), ".venv/bin/dagster definitions validate")
    result = run_block(readme_env["clone"], block, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "All code locations passed validation" in result.stdout + result.stderr


@pytest.mark.slow
def test_backfill_commands(readme_env):
    live: LiveDagster = readme_env["live"]
    before = _run_ids(live)
    block = _block_with(README.read_text(), ".venv/bin/dagster job backfill")
    result = run_block(readme_env["clone"], block)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with live.instance() as instance:
        runs = [instance.get_run_by_id(r) for r in _run_ids(live) - before]
        backfill = [r for r in runs if "dagster/backfill" in r.tags]
        launched = [r for r in runs if r.job_name == "daily_facts" and "dagster/backfill" not in r.tags]
        in_cli = [r for r in runs if r.job_name != "daily_facts"]
    statuses = _wait_runs_done(live, {r.run_id for r in runs})
    # The CLI's materialize and the launched run: one run each for the whole range.
    assert len(in_cli) == 1 and statuses[in_cli[0].run_id] == dg.DagsterRunStatus.SUCCESS
    assert len(launched) == 1, launched
    assert launched[0].tags["dagster/asset_partition_range_start"] == "2026-11-01"
    assert launched[0].tags["dagster/asset_partition_range_end"] == "2026-11-07"
    # The job backfill: one run per day, as the README says.
    assert sorted(r.tags.get("dagster/partition") for r in backfill) == ["2026-11-08", "2026-11-09"]
    assert all(s == dg.DagsterRunStatus.SUCCESS for s in statuses.values()), (statuses, live.log_tail())


@pytest.mark.slow
def test_export_commands(readme_env):
    live: LiveDagster = readme_env["live"]
    before = _run_ids(live)
    block = _block_with(README.read_text(), ".venv/bin/dagster job launch -w workspace.yaml -j customer_exports")
    result = run_block(readme_env["clone"], block)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    new = _run_ids(live) - before
    statuses = _wait_runs_done(live, new)
    assert len(new) == 2 and all(s == dg.DagsterRunStatus.SUCCESS for s in statuses.values()), \
        (statuses, live.log_tail())
    exports = readme_env["local"] / "exports"
    assert (exports / "company_id=7" / "training_report.parquet").exists()
    assert (exports / f"company_id={DEMO_COMPANIES}" / "training_report.csv").exists()

