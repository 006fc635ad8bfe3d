"""`python -m localenv up|down|status|simulate|summary|clean` (what the Make targets call)."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time

import psycopg

from .cluster import ClusterError
from .environment import LocalEnvironment, read_env_file
from .settings import LocalSettings, SettingError
from .simulator import simulate


def _print_status(env: LocalEnvironment) -> int:
    """Both servers' state (running, stopped or not created) and the replay lag; 0 whenever it
    could tell, 1 only when it could not (a server that does not answer, a port mismatch)."""
    try:
        status = env.cluster.status()
    except (ClusterError, psycopg.Error) as exc:
        print(f"error: could not read the servers' status: {exc}".strip(), file=sys.stderr)
        return 1
    for name in ("primary", "replica"):
        s = status[name]
        state = "running" if s["running"] else ("stopped" if s["initialized"] else "not created")
        print(f"{name:<8} {state:<12} 127.0.0.1:{s['port']}  {s['data_dir']}")
    replica = status["replica"]
    if "replay_lag_bytes" in replica:
        print(f"replica replay lag: {replica['replay_lag_bytes']} bytes, "
              f"{replica['replay_lag_seconds']} s (in recovery: {replica['in_recovery']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localenv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start primary + replica, create schema and demo data if missing")
    sub.add_parser("down", help="stop both servers, keep the data")
    sub.add_parser("status", help="servers' state and the replica's replay lag")
    sim = sub.add_parser("simulate", help="apply one batch of changes on the primary")
    sim.add_argument("--events", type=int, default=2000, help="new lesson events (default 2000)")
    sim.add_argument("--seed", type=int, default=None)
    sub.add_parser("summary", help="row counts read from the replica")
    sub.add_parser("clean", help="stop the servers and remove the local folder")
    args = parser.parse_args(argv)

    try:
        settings = LocalSettings.from_env()
        env = LocalEnvironment(settings)
        if args.command == "up":
            result = env.up()
            servers = (f"primary 127.0.0.1:{env.cluster.primary.port}, "
                       f"streaming replica 127.0.0.1:{env.cluster.replica.port}")
            if result["done"]:
                print(f"up in {result['seconds']}s: {servers}; settings in {settings.env_file}")
                print("  " + ", ".join(re.sub(r" on 127\.0\.0\.1:\d+$", "", d) for d in result["done"]))
            else:
                print(f"already up: nothing to do ({servers}; settings in {settings.env_file})")
            return 0
        if args.command == "down":
            for line in env.cluster.down() or ["nothing running"]:
                print(f"  {line}")
            return 0
        if args.command == "status":
            return _print_status(env)
        if args.command == "simulate":
            values = read_env_file(settings.env_file)
            if "PRIMARY_URL" not in values:
                print(f"{settings.env_file} has no PRIMARY_URL: run `make up` first", file=sys.stderr)
                return 2
            started = time.monotonic()
            with psycopg.connect(values["PRIMARY_URL"]) as conn:
                counts = simulate(conn, new_events=args.events, seed=args.seed)
            lag = env.cluster.wait_for_replay()
            for key, value in counts.items():
                print(f"  {key:<24} {value:>8}")
            print(f"applied in {time.monotonic() - started:.1f}s (replica caught up in {lag:.2f}s)")
            return 0
        if args.command == "summary":
            counts = env.replica_counts()
            print(f"replica: {len(counts)} tables, {sum(counts.values()):,} rows read through the read-only role "
                  f"({counts.get('lesson_events', 0):,} lesson events)")
            return 0
        if args.command == "clean":
            if settings.pg_dir.exists():
                env.cluster.down()
            shutil.rmtree(settings.local_dir, ignore_errors=True)
            print(f"  removed {settings.local_dir}")
            return 0
    except (SettingError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
