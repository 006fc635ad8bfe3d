"""Locally, a run whose processes all died is marked failed, so that its pool slots are freed.

Dagster's run monitoring asks the run launcher whether a run's worker is alive. ECS can tell
(production), the DefaultRunLauncher used locally cannot, and a run started by the CLI
(`dagster asset materialize`, `make demo`) has no launcher at all: killed, such a run stays
STARTED and keeps its `warehouse` slot, and every later refresh waits behind it. This sensor
is the worker health check of one machine; the monitoring daemon then frees the failed run's
slots after `free_slots_after_run_end_seconds` (dagster.yaml).
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg
import psutil

# How often STARTED runs are checked (a sensor evaluation reads their engine events).
RUN_HEALTH_INTERVAL_SECONDS = 15


def recorded_processes(instance: dg.DagsterInstance, run_id: str) -> list[tuple[int, float]]:
    """(pid, when it was recorded) of every process the run's engine events name: the run
    worker (the CLI's process or the launcher's subprocess), where the steps run (assembly.py)."""
    processes = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = (data.metadata or {}).get("pid") if data else None
        if pid is not None and str(pid.value).isdigit():
            processes.append((int(pid.value), entry.timestamp))
    return processes


def is_alive(pid: int, recorded_at: float) -> bool:
    try:
        process = psutil.Process(pid)
        # A process created after the event that named the pid is another one reusing it.
        return process.create_time() <= recorded_at + 1 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def dead_runs(instance: dg.DagsterInstance) -> Iterable[tuple[dg.DagsterRun, list[int]]]:
    """STARTED runs that named their processes, none of which is alive."""
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    for record in records:
        processes = recorded_processes(instance, record.dagster_run.run_id)
        if processes and not any(is_alive(pid, at) for pid, at in processes):
            yield record.dagster_run, sorted({pid for pid, _ in processes})


@dg.sensor(
    name="run_health",
    minimum_interval_seconds=RUN_HEALTH_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks failed a STARTED run whose processes on this machine are all gone "
    "(killed, crashed, machine restarted), so its warehouse pool slot is freed.",
)
def run_health(context: dg.SensorEvaluationContext):
    failed = []
    for run, pids in dead_runs(context.instance):
        # The run may have ended between the query and now: only a STARTED run is failed.
        current = context.instance.get_run_by_id(run.run_id)
        if current is None or current.status != dg.DagsterRunStatus.STARTED:
            continue
        message = (f"None of this run's processes is alive any more (pids {', '.join(map(str, pids))}): "
                   "killed or crashed without reporting. Marked failed by the run_health sensor; its "
                   "concurrency slots are freed by run monitoring (free_slots_after_run_end_seconds).")
        context.instance.report_run_failed(current, message)
        context.log.warning(f"run {run.run_id} ({run.job_name}): {message}")
        failed.append(run.run_id)
    return dg.SkipReason(f"marked failed: {', '.join(failed)}" if failed else "every STARTED run is alive")


def run_health_sensors(env: str) -> list[dg.SensorDefinition]:
    """The sensor where runs execute on the daemon's machine (local, pg); in production each
    run is an ECS task and run monitoring asks ECS."""
    return [] if env == "prod" else [run_health]
