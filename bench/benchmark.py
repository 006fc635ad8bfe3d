"""One benchmark run, end to end: source, measurements, results JSON, table, chart, doc.

Settings (environment variables, like the rest of the local environment): EVENTS (default
8,000,000), DAYS, SEED, LOCAL_DIR as for `make up`; BENCH_REPS (3) repetitions of each
measurement, BENCH_PG_REPS (1) of the PostgreSQL one, BENCH_STAGES (a,b,c,d,e), BENCH_SELECT
(dbt selection syntax: measure only those models; default every model).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from localenv.cluster import ClusterError
from localenv.settings import REPO_ROOT, SettingError

from . import report
from .environment import BenchSource, prepare
from .workloads import STAGES, Bench, BenchConfig

DEFAULT_EVENTS = 8_000_000
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DOC = REPO_ROOT / "docs" / "benchmarks.md"


def whole_number(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name) or ""
    try:
        value = int(raw.replace("_", "")) if raw else default
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingError(f"{name}={value} must be at least {minimum}")
    return value


def stages_from_env() -> tuple[str, ...]:
    raw = os.environ.get("BENCH_STAGES") or ",".join(STAGES)
    stages = tuple(s.strip() for s in raw.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise SettingError(f"BENCH_STAGES={raw!r}: valid stages are {', '.join(STAGES)}")
    return stages


def run_benchmark(source: BenchSource, config: BenchConfig, results_dir: Path, doc: Path) -> dict[str, Any]:
    """Measure, then write `<results_dir>/<id>.json` and `.png` and update `doc`."""
    started = datetime.now(UTC)
    load_at_start = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    measured = Bench(source, config).run()
    run_id = started.strftime("%Y%m%dT%H%M%SZ")
    results: dict[str, Any] = {
        "id": run_id,
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t0, 1),
        "machine": {**report.machine(), "load_average_1m_at_start": load_at_start},
        "versions": report.versions(source.local.cluster.bin),
        "scale": {"events": source.events, "source_events": source.source_events(),
                  "days": source.local.settings.days, "seed": source.local.settings.seed,
                  "prepared_s": source.prepared_s, "loaded_now": source.loaded},
        "config": {"repetitions": config.repetitions, "pg_repetitions": config.pg_repetitions,
                   "incremental_fraction": config.incremental_fraction, "stages": list(config.stages),
                   "select": config.select},
        "measurements": measured.measurements,
        **measured.extra,
    }
    results["ratios"] = report.ratios(results["measurements"])
    results["targets"] = report.targets(results["measurements"], results["ratios"])
    table_md = report.table(results)
    results["table_markdown"] = table_md
    chart = report.chart(results, results_dir / f"{run_id}.png")
    results["chart"] = chart.name
    report.write_json(results, results_dir / f"{run_id}.json")
    report.update_doc(doc, table_md, results, chart.name)
    return results


def main() -> int:
    from localenv.settings import LocalSettings

    started = time.perf_counter()
    try:
        local = LocalSettings.from_env()
        events = whole_number("EVENTS", DEFAULT_EVENTS)
        config = BenchConfig(
            work_dir=local.local_dir / f"bench-{events}" / "work",
            repetitions=whole_number("BENCH_REPS", 3),
            pg_repetitions=whole_number("BENCH_PG_REPS", 1),
            stages=stages_from_env(),
            select=os.environ.get("BENCH_SELECT") or None,
            # dbt's and Dagster's own output is captured; progress goes to the terminal.
            progress=lambda message: print(message, file=sys.__stdout__, flush=True),
        )
        source = prepare(local.local_dir, events, local.days, local.seed)
    except (SettingError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"  source ready in {source.prepared_s:.1f}s ({'loaded now' if source.loaded else 'reused'})")
    try:
        results = run_benchmark(source, config, RESULTS_DIR, DOC)
    finally:
        source.local.cluster.down()
    print()
    print(results["table_markdown"])
    print(f"results: {RESULTS_DIR / (results['id'] + '.json')}, chart: {RESULTS_DIR / results['chart']}, "
          f"doc: {DOC}")
    print(f"make bench took {time.perf_counter() - started:.0f}s")
    for stage, error in results.get("errors", {}).items():
        print(f"stage {stage} failed: {error}", file=sys.stderr)
    return 1 if results.get("errors") else 0
