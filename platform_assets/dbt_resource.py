"""The dbt resource: dagster-dbt's DbtCliResource without the fixed costs of every dbt op.

Profiled (docs/benchmarks.md), every dbt command costs seconds before it reads the project:
the dbt process imports dbt (about 3 s), which dbt_warm.py takes away by forking each
command from a process that has done it once (`dbt_executable(warm_start=True)`). And
before a dbt op's process even starts, DbtCliResource.cli()
1. runs `dbt --version` in a second process (importing all of dbt: about 3 s) once per
   resource instance, i.e. once per run, to learn the dbt version;
2. builds a dbt adapter inside the Dagster process (profile, project, and every macro of the
   project parsed again: 1-2.5 s) for `fetch_row_counts()` / `fetch_column_metadata()`.

(1) is the installed dbt-core's version whenever the executable is this environment's own
dbt. (2) is only used by those fetchers, which the platform calls on PostgreSQL and Redshift;
on DuckDB the warehouse file has a single writer, so the metadata is read after dbt exits
over a read-only connection of its own (dbt_assets._with_duckdb_metadata) and the adapter is
never used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from importlib import metadata

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging import version
from pydantic import Field

from . import dbt_warm


def dbt_executable(warm_start: bool) -> str:
    """The dbt executable for the resource: the warm client (dbt_warm.py), or the
    environment's own dbt when warm start is off or the client cannot be written (a
    read-only file system: dbt then runs cold, as it would without the platform)."""
    if warm_start:
        try:
            return dbt_warm.client_executable()
        except OSError as exc:
            logging.getLogger(__name__).warning("warm dbt start is off: cannot write its client (%s)", exc)
    return dbt_warm.real_dbt()


class PlatformDbtResource(DbtCliResource):
    """DbtCliResource for the platform's dbt ops (see the module docstring). Build it with
    `dbt_executable=dbt_executable(warm_start)`: with the warm client as its executable, a
    run's set-up of the resource starts this process's warm dbt server."""

    adapter_in_dagster: bool = Field(
        default=True,
        description="Build a dbt adapter in the Dagster process for dagster-dbt's row-count and "
        "column-metadata fetchers. False on DuckDB, where the platform reads that metadata itself.",
    )

    warm_parse_state: str | None = Field(
        default=None,
        description="A dbt partial-parse state of the project (the one the manifest's preparation "
        "saved): the warm dbt server reads and writes it once to compile dbt's artifact code before "
        "forking commands. Missing or None: each command compiles that code itself.",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        super().setup_for_execution(context)
        if self.dbt_executable == dbt_warm.client_path():
            dbt_warm.ensure_server(self.warm_parse_state)

    @cached_property
    def _cli_version(self) -> version.Version:
        # the environment's own dbt, directly or through the warm client
        if self.dbt_executable in (dbt_warm.real_dbt(), dbt_warm.client_path()):
            return version.parse(metadata.version("dbt-core"))
        return super()._cli_version

    def _initialize_dbt_core_adapter(self, args: Sequence[str]):
        if not self.adapter_in_dagster:
            return None
        return super()._initialize_dbt_core_adapter(args)
