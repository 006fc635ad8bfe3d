"""The measured flows, each repeated: (a) every asset through Dagster on DuckDB, (b) plain
`dbt build`, (c) the raw floor, (d) an incremental refresh through Dagster after a change
batch, (e) (a) on PostgreSQL. Every repetition of (a), (b), (c) and (e) starts from an empty
warehouse and (a)/(e) from an empty Dagster instance, so each one is a full refresh.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import build_dbt_asset_selection
from localenv.demo import PARTITION_RANGE_END, PARTITION_RANGE_START, Runner, automation_cycle, evaluate_automation
from localenv.environment import WAREHOUSE_DB
from localenv.simulator import simulate

from platform_assets.assembly import Platform, build_platform
from platform_assets.dbt_assets import INDIRECT_SELECTION_TAG, build_args
from platform_assets.dbt_project import prepare
from platform_assets.fingerprints import differing_days
from platform_assets.settings import DBT_PROJECT_DIR, REPO_ROOT, load_settings

from . import dbtlog, floor
from .environment import BenchSource
from .probe import Repetition, measure, summary
from .timeline import timeline

STAGES = ("a", "b", "c", "d", "e")
# The benchmark's own server (.local/bench-<EVENTS>), so its own `warehouse` database: the
# name the pg environment's manifest is parsed with everywhere else (make up, the tests).
# Another name makes the code location re-parse the manifest (about 20 s) each way.
PG_WAREHOUSE_DB = WAREHOUSE_DB
# (d)'s copy of the events its batches may edit or delete, on the primary while it runs.
SAVED_EVENTS = "app.bench_saved_lesson_events"


@dataclass
class BenchConfig:
    work_dir: Path
    repetitions: int = 3
    pg_repetitions: int = 1
    incremental_fraction: float = 0.01
    stages: tuple[str, ...] = STAGES
    # dbt selection syntax (BENCH_SELECT): every stage measures only these models; None = all
    select: str | None = None
    progress: Any = print


@dataclass
class Results:
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def environ(overrides: dict[str, str]) -> Iterator[None]:
    """os.environ with these values for a block (dbt subprocesses and EnvVar resources read it)."""
    saved = dict(os.environ)
    os.environ.update(overrides)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def median_nodes(reps: list[Repetition]) -> dict[str, float]:
    """Median seconds per dbt node over the repetitions that ran it."""
    seen: dict[str, list[float]] = {}
    for rep in reps:
        for uid, s in rep.detail.get("node_seconds", {}).items():
            seen.setdefault(uid, []).append(s)
    return {uid: round(statistics.median(v), 4) for uid, v in sorted(seen.items())}


def _record(results: Results, key: str, label: str, reps: list[Repetition], rows: int) -> dict:
    entry = {"label": label, **summary(reps, rows), "node_seconds": median_nodes(reps),
             "per_repetition": [{"seconds": round(r.seconds, 3), "peak_rss_bytes": r.peak_rss_bytes,
                                 **{k: v for k, v in r.detail.items() if k != "node_seconds"}} for r in reps]}
    results.measurements[key] = entry
    return entry


def _run_results(target_dir: Path, log: Path) -> dict[str, Any]:
    data = json.loads((target_dir / "run_results.json").read_text())
    return {"elapsed_s": data.get("elapsed_time", 0.0), "phases": dbtlog.phases(log),
            "node_seconds": {r["unique_id"]: r["execution_time"] for r in data["results"]},
            "failed": [r["unique_id"] for r in data["results"] if r["status"] in ("error", "fail")]}


def _add_phases(into: dict[str, Any], phases: dict[str, Any]) -> None:
    """Per-invocation dbt start-up + parse and execution seconds, summed over invocations."""
    into["dbt_full_parses"] = into.get("dbt_full_parses", 0) + int(bool(phases.get("full_parse")))
    for key in ("parse_s", "execute_s"):
        into[f"dbt_{key}"] = round(into.get(f"dbt_{key}", 0.0) + phases.get(key, 0.0), 3)


def dagster_run_artifacts(platform: Platform, instance: dg.DagsterInstance) -> dict[str, Any]:
    """dbt's run_results of every run in the instance, merged; the run folders are removed
    afterwards (the benchmark's runs only: they are named after the run ids)."""
    runs_dir = Path(platform.project.project_dir) / platform.project.target_path / "runs"
    merged: dict[str, Any] = {"dbt_invocations": 0, "dbt_elapsed_s": 0.0, "node_seconds": {}, "failed": []}
    for run in instance.get_runs():
        for folder in sorted(runs_dir.glob(f"*-{run.run_id[:7]}-*")):
            if (folder / "run_results.json").exists():
                rr = _run_results(folder, folder / "dbt.log")
                _add_phases(merged, rr["phases"])
                merged["dbt_invocations"] += 1
                merged["dbt_elapsed_s"] += rr["elapsed_s"]
                merged["node_seconds"].update(rr["node_seconds"])
                merged["failed"] += rr["failed"]
            shutil.rmtree(folder, ignore_errors=True)
    merged["dbt_elapsed_s"] = round(merged["dbt_elapsed_s"], 3)
    return merged


def dbt_keys(platform: Platform, select: str | None = None) -> set[dg.AssetKey]:
    """The assets `dbt build [--select select]` builds: the models and snapshots of the two
    dbt asset sets (those the selection names)."""
    sets = (platform.dbt_models, platform.dbt_daily_facts)
    keys = {key for assets_def in sets for key in assets_def.keys}
    if select:
        graph = platform.defs.resolve_asset_graph()
        keys &= {key for assets_def in sets
                 for key in build_dbt_asset_selection([assets_def], dbt_select=select).resolve(graph)}
        if not keys:
            raise ValueError(f"BENCH_SELECT={select!r} selects no dbt model")
    return keys


def full_refresh(platform: Platform, instance: dg.DagsterInstance, progress,
                 select: str | None = None) -> dict[str, Any]:
    """localenv.demo.run_all's runs, limited to the dbt assets (the selection plain dbt builds;
    assets outside dbt are not part of the seed's flow): observe the sources; everything not
    downstream of the daily facts; the facts over every partition and what reads them."""
    r = Runner(platform, instance, progress)
    keys = dbt_keys(platform, select)
    after_daily = (dg.AssetSelection.assets(*r.daily_keys).downstream().resolve(r.graph) & keys) - r.daily_keys
    before_daily = keys - after_daily - r.daily_keys
    r.observe()
    partitions = platform.dbt_daily_facts.partitions_def.get_partition_keys()
    # As in run_all: tests whose parents are in two runs wait for the second one.
    if before_daily:
        r.subset("staging, dimensions, snapshots", before_daily, tags={INDIRECT_SELECTION_TAG: "cautious"})
    if (r.daily_keys | after_daily) & keys:
        r.subset("daily facts and what reads them", (r.daily_keys & keys) | after_daily,
                 tags={PARTITION_RANGE_START: partitions[0], PARTITION_RANGE_END: partitions[-1]})
    return {"materialized": r.materialized & keys, "expected": keys}


def refresh(platform: Platform, instance: dg.DagsterInstance, cursor, progress, select: str | None = None) -> dict:
    """localenv.demo.automation_cycle as the sensors' ordinary tick runs it (observe, evaluate
    the automation conditions, run what they request and the recent days of the daily facts
    that differ from the replica, until nothing more is requested), limited to the dbt assets."""
    r = Runner(platform, instance, progress)
    cursor = automation_cycle(r, instance, cursor, keys=dbt_keys(platform, select), recent=True)
    return {"materialized": r.materialized, "cursor": cursor}


def restore_events(conn) -> None:
    """(d)'s source back as it was: the batches' new events (ids above the copy's newest) and
    the copied rows go, the copy comes back, in one transaction."""
    with conn.transaction():
        conn.execute(f"delete from app.lesson_events where event_id > (select max(event_id) from {SAVED_EVENTS})"
                     f" or event_id in (select event_id from {SAVED_EVENTS})")
        conn.execute(f"insert into app.lesson_events select * from {SAVED_EVENTS}")
        conn.execute(f"drop table {SAVED_EVENTS}")


def remove_duckdb_file(path: Path) -> None:
    """An empty warehouse for the next repetition: the DuckDB file and its write-ahead log gone."""
    path.unlink(missing_ok=True)
    Path(f"{path}.wal").unlink(missing_ok=True)


def _new_instance(home: Path) -> dg.DagsterInstance:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text((REPO_ROOT / "dagster.yaml").read_text())
    with environ({"DAGSTER_HOME": str(home)}):
        return dg.DagsterInstance.get()


class Bench:
    def __init__(self, source: BenchSource, config: BenchConfig):
        self.source, self.config, self.results = source, config, Results()
        self.work = config.work_dir
        self.work.mkdir(parents=True, exist_ok=True)
        self.say = config.progress
        self.rows = source.source_events()
        # The daily partitions start where the data starts, as a deployment of this dataset
        # would set FACT_PARTITIONS_START (the default start is for the demo's calendar):
        # empty partitions before the first event would only add orchestration work.
        with source.primary() as conn:
            first_day = conn.execute("select min(occurred_at)::date from app.lesson_events").fetchone()[0]
        self.partitions_start = os.environ.get("FACT_PARTITIONS_START") or first_day.isoformat()

    @contextmanager
    def captured(self) -> Iterator[None]:
        """dbt's and Dagster's console output go to work/bench.log, not between the results."""
        with open(self.work / "bench.log", "a") as log, redirect_stdout(log), redirect_stderr(log):
            yield

    # -- environments ---------------------------------------------------------------------
    def platform_environ(self, env: str, folder: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
        folder.mkdir(parents=True, exist_ok=True)
        # A slice of the graph: only the tests whose parents are all in it (a relationship
        # test towards a model outside the slice would find no table).
        cautious = {"DBT_INDIRECT_SELECTION": "cautious"} if self.config.select else {}
        return {**self.source.values, **cautious, "PLATFORM_ENV": env,
                "FACT_PARTITIONS_START": self.partitions_start,
                "PLATFORM_ENV_FILE": str(folder / "no-platform.env"),  # never .local/platform.env
                "DUCKDB_PATH": str(folder / "warehouse.duckdb"), **(extra or {})}

    def _load_platform(self, env: str) -> Platform:
        """The platform for a stage, loaded before its clock starts (its manifest prepared if
        stale), and the parse state its dbt commands start from made with the stage's own
        settings, as a deployment's is after its first command. The shared manifest is left
        alone: other processes may be reading it."""
        t0 = time.perf_counter()
        with self.captured():
            platform = build_platform(load_settings())
            prepare(platform.project, publish=False)
        self.results.extra.setdefault("platform_load_s", {})[env] = round(time.perf_counter() - t0, 3)
        return platform

    # -- set-up, before any clock ---------------------------------------------------------------
    def prepare_parses(self) -> None:
        """(b) is measured with a warm partial parse, as a user's earlier command leaves it: its
        parse state is made here, before any clock (`dbt parse` with (b)'s settings and target)."""
        if "b" not in self.config.stages and "c" not in self.config.stages:
            self.results.extra["setup"] = {"parsed": [], "seconds": 0.0}
            return
        t0 = time.perf_counter()
        cmd, env, target = self.plain_dbt("parse")
        proc = subprocess.run(cmd, env=env, cwd=DBT_PROJECT_DIR, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dbt parse for (b) failed ({proc.returncode}):\n{proc.stdout[-2000:]}")
        self.results.extra["setup"] = {"parsed": ["plain dbt"], "seconds": round(time.perf_counter() - t0, 3)}

    # -- (b) plain dbt build and (c) the raw floor ----------------------------------------------
    def plain_dbt(self, command: str) -> tuple[list[str], dict[str, str], Path]:
        """(b)'s dbt command line, environment and target folder: its own folder, warehouse,
        target and logs, the platform's arguments for `command`."""
        folder = self.work / "dbt"
        target = folder / "target"
        env = {**os.environ, **self.platform_environ("local", folder)}
        select = ["--select", self.config.select] if self.config.select and command == "build" else []
        cmd = [str(Path(sys.executable).parent / "dbt"), *build_args(command), "--target", "local",
               "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR),
               "--target-path", str(target), "--log-path", str(folder / "logs"), *select]
        return cmd, env, target

    def dbt_build(self) -> Path:
        cmd, env, target = self.plain_dbt("build")
        folder = target.parent
        duckdb_path = folder / "warehouse.duckdb"

        def once() -> dict[str, Any]:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=DBT_PROJECT_DIR)
            if proc.returncode != 0:
                raise RuntimeError(f"dbt build failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
            rr = _run_results(target, folder / "logs" / "dbt.log")
            out = {"dbt_invocations": 1, "dbt_elapsed_s": round(rr["elapsed_s"], 3),
                   "node_seconds": rr["node_seconds"], "failed": rr["failed"]}
            _add_phases(out, rr["phases"])
            return out

        reps = self._repeat("b", "plain dbt build (local)", once, self.config.repetitions,
                            setup=lambda: remove_duckdb_file(duckdb_path))
        _record(self.results, "b", "plain `dbt build`, DuckDB", reps, self.rows)
        return target

    def raw_floor(self, dbt_target: Path) -> None:
        steps = floor.plan(dbt_target)
        path = self.work / "floor" / "warehouse.duckdb"
        path.parent.mkdir(parents=True, exist_ok=True)

        def once() -> dict[str, Any]:
            out = floor.run(steps, path, self.source.values)
            return {"node_seconds": out["node_seconds"], "threads": out["threads"],
                    "models_s": round(out["models_s"], 3),
                    "tests_s": round(out["tests_s"], 3), "test_failures": out["test_failures"]}

        reps = self._repeat("c", "raw floor (compiled SQL on DuckDB)", once, self.config.repetitions,
                            setup=lambda: remove_duckdb_file(path))
        entry = _record(self.results, "c", "raw floor: compiled SQL on DuckDB", reps, self.rows)
        entry["statements"] = len(steps)

    # -- (a) + (d) on DuckDB, (e) on PostgreSQL -----------------------------------------------
    def dagster_local(self) -> None:
        folder = self.work / "dagster-local"
        with environ(self.platform_environ("local", folder)):
            platform = self._load_platform("local")
            duckdb_path = folder / "warehouse.duckdb"
            instance = self._full_refreshes("a", "Dagster full refresh (local)", platform, folder,
                                            lambda: remove_duckdb_file(duckdb_path),
                                            self.config.repetitions)
            try:
                if "d" in self.config.stages:
                    self.incremental(platform, instance)
                    self.change_detection(platform)
            finally:
                instance.dispose()

    def dagster_pg(self) -> None:
        folder = self.work / "dagster-pg"
        extra = self.source.fresh_pg_warehouse(PG_WAREHOUSE_DB)
        with environ(self.platform_environ("pg", folder, extra)):
            platform = self._load_platform("pg")
            instance = self._full_refreshes(
                "e", "Dagster full refresh (pg)", platform, folder,
                lambda: self.source.fresh_pg_warehouse(PG_WAREHOUSE_DB), self.config.pg_repetitions)
            instance.dispose()

    def _full_refreshes(self, key: str, label: str, platform: Platform, folder: Path, reset,
                        repetitions: int) -> dg.DagsterInstance:
        """Repetitions of run_all, each on an empty warehouse and instance (made before the
        clock starts: a deployment's instance exists before its refreshes); the last
        instance is returned (open) for the incremental stage."""
        instances: list[dg.DagsterInstance] = []

        def empty_warehouse_and_instance() -> None:
            if instances:
                instances.pop().dispose()
            reset()
            instances.append(_new_instance(folder / "dagster-home"))

        def once() -> dict[str, Any]:
            instance = instances[-1]
            with environ({"DAGSTER_HOME": str(folder / "dagster-home")}), self.captured():
                summary_ = full_refresh(platform, instance, progress=lambda m: self.say(f"    {m.strip()}"),
                                        select=self.config.select)
            missing = summary_["expected"] - summary_["materialized"]
            if missing:
                raise RuntimeError(f"{label}: not materialized: {sorted(k.to_user_string() for k in missing)}")
            runs_dir = Path(platform.project.project_dir) / platform.project.target_path / "runs"
            return {"assets_materialized": len(summary_["materialized"]),
                    "dagster_runs": len(instance.get_runs()), "timeline": timeline(instance, runs_dir),
                    **dagster_run_artifacts(platform, instance)}

        reps = self._repeat(key, label, once, repetitions, setup=empty_warehouse_and_instance)
        engine = "DuckDB" if key == "a" else "PostgreSQL"
        _record(self.results, key, f"every asset through Dagster, {engine}", reps, self.rows)
        return instances[-1]

    def incremental(self, platform: Platform, instance: dg.DagsterInstance) -> None:
        """(d): a change batch of ~1% new events plus updates on the primary, replayed on the
        replica (not timed), then what the automation sensors do (timed)."""
        new_events = max(1, round(self.source.events * self.config.incremental_fraction))
        with self.captured():  # Dagster's own warnings go to bench.log, not between the results
            cursor = evaluate_automation(platform.defs, instance).cursor
        with self.source.primary() as conn:
            # The batches also edit and delete events of the last week (localenv/simulator.py):
            # kept here, put back at the end, so the source keeps its scale and contents. A copy
            # left by an interrupted run is put back first.
            if conn.execute("select to_regclass(%s)", (SAVED_EVENTS,)).fetchone()[0]:
                restore_events(conn)
            conn.execute(f"create table {SAVED_EVENTS} as select * from app.lesson_events"
                         " where occurred_at >= (now() at time zone 'utc')::timestamp - interval '8 days'"
                         " or event_id = (select max(event_id) from app.lesson_events)")
        state = {"cursor": cursor, "seed": 0}

        def once() -> dict[str, Any]:
            t0 = time.perf_counter()
            with self.source.primary() as conn:
                changes = simulate(conn, new_events=new_events, seed=1000 + state["seed"])
            self.source.local.cluster.wait_for_replay(timeout=600)
            change_s = time.perf_counter() - t0
            state["seed"] += 1
            before = {r.run_id for r in instance.get_runs()}
            return {"change_batch": changes, "change_batch_s": round(change_s, 3), "_before": before}

        reps: list[Repetition] = []
        try:
            for i in range(self.config.repetitions):
                prep = once()  # the change batch is not part of the measurement
                before = prep.pop("_before")
                with environ({"DAGSTER_HOME": str(instance.root_directory)}), self.captured():
                    rep = measure(lambda: refresh(platform, instance, state["cursor"],
                                                  progress=lambda m: self.say(f"    {m.strip()}"),
                                                  select=self.config.select))
                state["cursor"] = rep.detail.pop("cursor")
                with self.source.primary() as conn:  # what the recent days held, not timed
                    rep.detail["recent_window"] = dict(zip(("events", "source_events"), conn.execute(
                        "select count(*) filter (where occurred_at >= %s), count(*) from app.lesson_events",
                        (platform.daily_facts.recent_start(),)).fetchone(), strict=True),
                        days=platform.daily_facts.recent_days)
                # correct: nothing differs from the replica once the refresh is done
                with dg.build_resources({"replica": platform.defs.resources["replica"],
                                         "warehouse": platform.defs.resources["warehouse"]}) as res:
                    rep.detail["days_differing_after"] = len(platform.daily_facts.differing(res.replica,
                                                                                           res.warehouse))
                materialized = sorted(k.to_user_string() for k in rep.detail.pop("materialized"))
                new_runs = [r for r in instance.get_runs() if r.run_id not in before]
                artifacts = dagster_run_artifacts(platform, instance)
                rep.detail.update(prep, materialized=materialized, dagster_runs=len(new_runs), **artifacts)
                self.say(f"  (d) repetition {i + 1}: {rep.seconds:.1f}s, {len(materialized)} assets refreshed"
                         f" after {prep['change_batch']['lesson_events_inserted']:,} new events")
                reps.append(rep)
        finally:
            # Keep the scale: the benchmark's own new events leave the source again.
            with self.source.primary() as conn:
                restore_events(conn)
            self.source.local.cluster.wait_for_replay(timeout=600)
        entry = _record(self.results, "d", "incremental refresh through Dagster after a ~1% batch "
                        "(new and late events, edits, deletes; recent days compared)", reps, new_events)
        entry["new_events_per_batch"] = new_events
        entry["days_differing_after"] = [r.detail.get("days_differing_after") for r in reps]
        entry["recent_window"] = reps[-1].detail.get("recent_window")

    def change_detection(self, platform: Platform) -> None:
        """(f): the comparison that decides what the daily facts rebuild, alone: the per-day
        fingerprints of every day on the replica and in the warehouse (docs/change-detection.md)."""
        facts = platform.daily_facts
        resources = {"replica": platform.defs.resources["replica"], "warehouse": platform.defs.resources["warehouse"]}

        def once() -> dict[str, Any]:
            with dg.build_resources(resources) as res:
                t0 = time.perf_counter()
                replica = facts.replica_fingerprints(res.replica)
                t1 = time.perf_counter()
                warehouse = facts.warehouse_fingerprints(res.warehouse)
                t2 = time.perf_counter()
            return {"replica_s": round(t1 - t0, 3), "warehouse_s": round(t2 - t1, 3), "days": len(replica),
                    "days_differing": len(differing_days(replica, warehouse))}

        reps = [measure(once) for _ in range(self.config.repetitions)]
        _record(self.results, "f", "change detection alone: per-day fingerprints, replica + warehouse",
                reps, self.source.events)

    # -- helpers -----------------------------------------------------------------------------
    def _repeat(self, key: str, label: str, fn, repetitions: int, setup=None) -> list[Repetition]:
        """`repetitions` measurements of `fn`, each after `setup` (not timed)."""
        reps = []
        for i in range(repetitions):
            if setup is not None:
                setup()
            rep = measure(fn)
            self.say(f"  ({key}) {label}, repetition {i + 1}/{repetitions}: {rep.seconds:.1f}s, "
                     f"peak RSS {rep.peak_rss_bytes / 2**20:,.0f} MiB")
            reps.append(rep)
        return reps

    def _stage(self, name: str, fn, *args):
        """A failed stage is recorded (and reported) without losing the others' results."""
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the results, never swallowed silently
            self.results.extra.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            self.say(f"  stage {name} FAILED: {type(exc).__name__}: {str(exc)[:500]}")
            return None

    def run(self) -> Results:
        stages = self.config.stages
        self._stage("setup", self.prepare_parses)
        if "b" in stages or "c" in stages:
            target = self._stage("b", self.dbt_build)
            if "c" in stages and target is not None:
                self._stage("c", self.raw_floor, target)
        if "a" in stages:
            self._stage("a", self.dagster_local)
        if "e" in stages:
            self._stage("e", self.dagster_pg)
        return self.results
