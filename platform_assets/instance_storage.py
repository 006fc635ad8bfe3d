"""The local Dagster instance's SQLite storage (dagster.yaml), made cheaper per write.

Dagster's SQLite run and event log storages build a new SQLAlchemy engine, and open a new
SQLite connection, for every use (`NullPool`). So every statement is compiled again, and
every write ends with the connection's close, which in WAL mode (Dagster sets it) is the
last connection to the file: SQLite checkpoints the log into the database and fsyncs it.
A full refresh of the platform stores about 1,000 events (every dbt test is an asset check,
every daily partition its own materialization): measured here, about 20 ms each, most of
it those costs.

These subclasses change only that:
- one engine per database file, kept, with one connection kept open in it (SQLite in WAL
  mode lets any number of processes hold connections; locks are taken per transaction,
  so the webserver, the daemon and run workers share the files as before);
- `PRAGMA synchronous=NORMAL` on each connection: a commit no longer waits for an fsync of
  the log (SQLite still checkpoints it, every 1000 pages). In WAL mode that is durable
  against a crash of any process, not against a power cut of the machine, which could lose
  the last moments of a local instance's run history. Production does not use this
  storage: deploy/dagster.yaml is dagster-postgres.

And three things per event:
- Dagster's SQLite event log asks whether a table exists (`has_table`: asset_event_tags,
  asset_check_executions) before storing nearly every asset and check event, and answers
  with a new engine, a new connection and SQLAlchemy's reflection each time: about 15% of
  the Dagster process's time in a full refresh. Here the index's kept engine answers, and a
  table found is remembered (migrations add tables and `wipe` only empties them; a table not
  found is asked about again).
- A planned asset check of a partitioned asset is stored as one row per partition, and
  Dagster serialises the whole event again for each row (a daily backfill's check over 120
  partitions: 120 serialisations, about 80 ms; a full refresh plans 22 such checks). The
  event log here serialises it once and inserts the rows as one executemany
  (`_store_asset_check_evaluation_planned`, same rows).
- A batch of events (when DAGSTER_EVENT_BATCH_SIZE is set, and `platform_assets.settings`
  sets it, Dagster hands the storage a run's planned events, and an asset's
  materializations of a partition range, as one batch each) is stored in one transaction
  per database, each asset's row updated with its last event, as dagster-postgres does
  (`store_event_batch`). Dagster's SQLite storage stores it event by event: a daily
  backfill over 120 days plans 240 materializations before dbt starts and stores 240 after
  it has finished.

Same files, same layout as the default `storage: sqlite` (runs.db under history/, one .db
per run plus index.db under history/runs/), so an existing local instance keeps its history.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import dagster._check as check
import sqlalchemy as db
from dagster import EventLogEntry, Field, StringSource
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS, BATCH_WRITABLE_EVENTS, DagsterEventType
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._serdes import ConfigurableClassData, serialize_value
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

if TYPE_CHECKING:
    from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationPlanned

# Run databases whose engines (and open connections) are kept, the most recently used: a
# webserver reads many runs, a run writes to its own and to the index.
MAX_CACHED_RUN_ENGINES = 32


class StorageSettingError(ValueError):
    pass


def _synchronous_normal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def sqlite_engine(conn_string: str) -> Engine:
    # The storages use one connection at a time (the event log holds its lock around each
    # use); the overflow is for the run storage's callers on other threads.
    engine = create_engine(conn_string, poolclass=QueuePool, pool_size=1, max_overflow=4,
                           connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})
    db.event.listen(engine, "connect", _synchronous_normal)
    return engine


def default_base_dir(*parts: str) -> str:
    """Where `storage: sqlite` keeps the same files: under $DAGSTER_HOME."""
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise StorageSettingError(
            "DAGSTER_HOME is not set: platform_assets.instance_storage keeps the instance's "
            "SQLite files under $DAGSTER_HOME (or give the storage a `base_dir` in dagster.yaml)")
    return os.path.join(os.path.abspath(home), *parts)


class LocalSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage with a kept engine (and connection) per database and
    `synchronous=NORMAL`."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        # Before the parent's __init__: it may already connect (a new index shard is reindexed).
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_lock = threading.Lock()
        self._tables_found: set[str] = set()
        super().__init__(base_dir, inst_data)

    @classmethod
    def config_type(cls) -> dict:
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,
                          config_value: Mapping[str, Any]) -> LocalSqliteEventLogStorage:
        base_dir = config_value.get("base_dir") or default_base_dir("history", "runs")
        return cls(base_dir, inst_data=inst_data)

    def _engine(self, shard: str) -> Engine:
        with self._engines_lock:
            engine = self._engines.get(shard)
            if engine is not None:
                self._engines.move_to_end(shard)
                return engine
            engine = self._engines[shard] = sqlite_engine(self.conn_string_for_shard(shard))
            while len(self._engines) > MAX_CACHED_RUN_ENGINES + 1:  # + the index shard
                oldest = next(s for s in self._engines if s != INDEX_SHARD_NAME)
                self._engines.pop(oldest).dispose()
            return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # The parent's _connect with the engine kept: same lock, same lazy initialisation.
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def has_table(self, table_name: str) -> bool:
        # Not under _db_lock: the parent asks while it holds an index connection.
        if table_name in self._tables_found:
            return True
        engine = self._engine(INDEX_SHARD_NAME)
        with engine.connect() as conn:
            found = bool(engine.dialect.has_table(conn, table_name))
        if found:
            self._tables_found.add(table_name)
        return found

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        # SqliteEventLogStorage.store_event for each event, with one transaction on the run's
        # database and one on the index for the whole batch (a run's planned events, an
        # asset's materializations of a partition range); the asset rows are updated with the
        # last event of each asset and kind, as dagster-postgres does for a batch.
        check.sequence_param(events, "events", of_type=EventLogEntry)
        types = {event.get_dagster_event().event_type for event in events}
        check.invariant(types <= BATCH_WRITABLE_EVENTS,
                        f"{BATCH_WRITABLE_EVENTS} are the only currently supported events for batch writes.")
        if len({event.run_id for event in events}) != 1 or DagsterEventType.ASSET_FAILED_TO_MATERIALIZE in types:
            super().store_event_batch(events)  # one by one, as without batches
            return
        rows = [self._event_to_row(event) for event in events]  # each event serialised once
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(SqlEventLogStorageTable.insert(), rows)
        with self.index_transaction() as conn:
            event_ids = [conn.execute(SqlEventLogStorageTable.insert(), row).inserted_primary_key[0]
                         for row in rows]
            assets = [(event, event_id) for event, event_id in zip(events, event_ids, strict=True)
                      if event.dagster_event_type in ASSET_EVENTS]
            self._store_asset_event_tags(conn, [e for e, _ in assets], [i for _, i in assets])
            last = {(event.dagster_event.asset_key, event.dagster_event_type): (event, event_id)
                    for event, event_id in assets}
            for event, event_id in sorted(last.values(), key=lambda pair: pair[1]):
                self._store_asset_event(conn, event, event_id)
        for event, event_id in zip(events, event_ids, strict=True):
            if event.dagster_event_type in ASSET_CHECK_EVENTS:
                self.store_asset_check_event(event, event_id)

    def _store_asset_check_evaluation_planned(self, event: EventLogEntry, event_id: int | None) -> None:
        # The parent's rows, with the event serialised once instead of once per partition.
        planned = cast("AssetCheckEvaluationPlanned", check.not_none(event.dagster_event).event_specific_data)
        partition_keys = planned.partitions_subset.get_partition_keys() if planned.partitions_subset else [None]
        row = dict(
            asset_key=planned.asset_key.to_string(),
            check_name=planned.check_name,
            run_id=event.run_id,
            execution_status=AssetCheckExecutionRecordStatus.PLANNED.value,
            evaluation_event=serialize_value(event),
            evaluation_event_timestamp=self._event_insert_timestamp(event),
            evaluation_event_storage_id=event_id,
        )
        with self.index_connection() as conn:
            conn.execute(AssetCheckExecutionsTable.insert(),
                         [dict(row, partition=partition_key) for partition_key in partition_keys])

    def _close_engines(self) -> None:
        self._tables_found.clear()
        with self._engines_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    def wipe(self) -> None:
        # The parent unlinks the run databases: no kept connection may point at a removed file.
        self._close_engines()
        super().wipe()
        self._close_engines()

    def dispose(self) -> None:
        super().dispose()
        self._close_engines()


class LocalSqliteRunStorage(SqliteRunStorage):
    """SqliteRunStorage with its engine kept and `synchronous=NORMAL`."""

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None):
        self._engine = sqlite_engine(conn_string)
        super().__init__(conn_string, inst_data)

    @classmethod
    def config_type(cls) -> dict:
        return {"base_dir": Field(StringSource, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None,  # ty: ignore[invalid-method-override]
                          config_value: Mapping[str, Any]) -> LocalSqliteRunStorage:
        base_dir = config_value.get("base_dir") or default_base_dir("history")
        return cls.from_local(base_dir, inst_data=inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            with conn.begin():
                yield conn

    def dispose(self) -> None:
        super().dispose()
        self._engine.dispose()
