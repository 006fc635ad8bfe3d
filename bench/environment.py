"""The benchmark's source: a primary + streaming replica of its own per scale.

`<LOCAL_DIR>/bench-<EVENTS>` holds the servers, the ports they were created with (bench.json)
and every warehouse the benchmark builds; the demo's `.local` (ports 54320/54321) is never
touched. A folder already loaded at that scale is reused as it is: only the first run of a
scale pays for the load (`make up` at 8M events: about 90 s).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import psycopg
from localenv.environment import WAREHOUSE_ROLE, LocalEnvironment
from localenv.settings import LocalSettings
from psycopg import sql


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken and port not in (54320, 54321):
            return port


@dataclass
class BenchSource:
    """A running primary + replica at one scale and the values the platform needs for it."""

    local: LocalEnvironment
    values: dict[str, str]
    prepared_s: float
    loaded: bool

    @property
    def events(self) -> int:
        return self.local.settings.events

    def primary(self) -> psycopg.Connection:
        return psycopg.connect(self.values["PRIMARY_URL"], autocommit=True)

    def source_events(self) -> int:
        with psycopg.connect(self.values["REPLICA_URL"]) as conn:
            return conn.execute("select count(*) from app.lesson_events").fetchone()[0]

    def fresh_pg_warehouse(self, name: str) -> dict[str, str]:
        """An empty warehouse database (as `make up` creates it), dropped first if it exists,
        so that a run on the `pg` target is a full build. Returns the settings."""
        with self.local.cluster.primary.connect() as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("create database {} owner {}").format(
                sql.Identifier(name), sql.Identifier(WAREHOUSE_ROLE)))
            conn.execute(sql.SQL("revoke all on database {} from public").format(sql.Identifier(name)))
        with self.local.cluster.primary.connect(name) as conn:
            conn.execute("create extension if not exists postgres_fdw")
            conn.execute(sql.SQL("grant usage on foreign data wrapper postgres_fdw to {}").format(
                sql.Identifier(WAREHOUSE_ROLE)))
        return self.pg_warehouse_values(name)

    def pg_warehouse_values(self, name: str) -> dict[str, str]:
        """The settings of the warehouse database `name` on the primary (the `pg` target's)."""
        url = self.values["WAREHOUSE_PG_URL"].rsplit("/", 1)[0]
        return {"WAREHOUSE_PG_DB": name, "WAREHOUSE_PG_URL": f"{url}/{name}"}


def prepare(local_dir: Path, events: int, days: int, seed: int, progress=print) -> BenchSource:
    """Start (and on first use create and load) the environment of this scale."""
    folder = local_dir / f"bench-{events}"
    meta_file = folder / "bench.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        primary = _free_port(set())
        meta = {"primary_port": primary, "replica_port": _free_port({primary})}
        folder.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    settings = LocalSettings(local_dir=folder, primary_port=meta["primary_port"],
                             replica_port=meta["replica_port"], events=events, days=days, seed=seed)
    local = LocalEnvironment(settings)
    progress(f"source: {events:,} events in {folder} (ports {settings.primary_port}/{settings.replica_port})")
    result = local.up(progress=lambda m: progress(f"  {m}"))
    return BenchSource(local=local, values=result["env"], prepared_s=result["seconds"],
                       loaded=result["loaded"] is not None)


def from_running(local: LocalEnvironment, values: dict[str, str]) -> BenchSource:
    """An environment someone else started (the test suite's), used as it is."""
    return BenchSource(local=local, values=dict(values), prepared_s=0.0, loaded=False)
