"""Where one repetition through Dagster spends its time: each run's event log and each dbt
command's own log, as consecutive phases in seconds from the first run's first event. The
latest (a) repetition's is printed in docs/benchmarks.md, so the explanation of a/b never
rests on an older run's profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from . import dbtlog

T = dg.DagsterEventType
ENDS = (T.STEP_SUCCESS, T.STEP_FAILURE)


def timeline(instance: dg.DagsterInstance, runs_dir: Path) -> list[dict[str, Any]]:
    """Phases (from, to, seconds, what) of every run in the instance, in order."""
    runs = []
    for run in instance.get_runs():
        logs = instance.all_logs(run.run_id)
        if logs:
            runs.append((logs[0].timestamp, run, logs))
    runs.sort(key=lambda r: r[0])
    if not runs:
        return []
    t0 = runs[0][0]
    phases: list[dict[str, Any]] = []

    def add(start: float, end: float, what: str) -> None:
        phases.append({"from": round(start - t0, 1), "to": round(end - t0, 1), "s": round(end - start, 1),
                       "what": what})

    for created, run, logs in runs:
        name = f"{run.job_name}" + (" (partition range)" if "dagster/asset_partition_range_start" in run.tags else "")
        first_step = next((e.timestamp for e in logs if e.dagster_event_type == T.STEP_START), created)
        add(created, first_step, f"run {run.run_id[:8]} {name}: plan and start stored, run started")
        last = first_step
        for start in (e for e in logs if e.dagster_event_type == T.STEP_START):
            step = start.step_key
            end = next((e.timestamp for e in logs if e.dagster_event_type in ENDS and e.step_key == step),
                       logs[-1].timestamp)
            folder = next(iter(sorted(runs_dir.glob(f"{step}-{run.run_id[:7]}-*"))), None)
            dbt = dbtlog.window(folder / "dbt.log") if folder else None
            if dbt is None:
                add(start.timestamp, end, f"step {step}")
            else:
                launched = next((e.timestamp for e in logs if e.step_key == step and e.dagster_event is None
                                 and (e.user_message or "").startswith("Running dbt command")), start.timestamp)
                add(start.timestamp, launched, f"step {step}: the preflight and dagster-dbt's dbt adapter, "
                    "in the Dagster process")
                add(launched, dbt["start"], "dbt's process: Python start and imports")
                add(dbt["start"], dbt["parsed"], "dbt: start-up and partial parse")
                add(dbt["parsed"], dbt["end"], "dbt: execution")
                add(dbt["end"], end, "the step's events, metadata and checks stored")
            last = end
        add(last, logs[-1].timestamp, "run end stored")
    return phases


def markdown(phases: list[dict[str, Any]]) -> str:
    lines = ["| from | to | s | what |", "| ---: | ---: | ---: | --- |"]
    lines += [f"| {p['from']:.1f} | {p['to']:.1f} | {p['s']:.1f} | {p['what']} |" for p in phases]
    return "\n".join(lines) + "\n"
