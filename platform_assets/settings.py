"""The platform's configuration: one environment switch and the variables it needs.

`PLATFORM_ENV` = local | pg | prod resolves the dbt target and every resource. Every
environment appears in every map below; an unknown environment or a missing variable is an
error naming it, never a silent fallback.

For the local environments (local, pg) the values `make up` writes to
`.local/platform.env` are read too (variables already set in the process win), so that
`dagster dev` or the CLI works without sourcing the file first.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DBT_PROJECT_DIR = REPO_ROOT / "dbt"

ENVIRONMENTS = ("local", "pg", "prod")

# dbt target per environment (profiles.yml)
DBT_TARGETS = {"local": "local", "pg": "pg", "prod": "prod"}
# warehouse engine per environment (asset kinds, metadata fetching strategy)
ENGINES = {"local": "duckdb", "pg": "postgres", "prod": "redshift"}
# variables each environment must have (read lazily, when a resource needs them)
REQUIRED_VARIABLES = {
    "local": ("REPLICA_URL", "DUCKDB_PATH", "REPLICA_HOST", "REPLICA_PORT", "REPLICA_DB",
              "REPLICA_USER", "REPLICA_PASSWORD", "REPLICA_SCHEMA"),
    "pg": ("REPLICA_URL", "WAREHOUSE_PG_HOST", "WAREHOUSE_PG_PORT", "WAREHOUSE_PG_DB",
           "WAREHOUSE_PG_USER", "WAREHOUSE_PG_PASSWORD", "REPLICA_HOST", "REPLICA_PORT",
           "REPLICA_DB", "REPLICA_USER", "REPLICA_PASSWORD", "REPLICA_SCHEMA"),
    "prod": ("REPLICA_URL", "REDSHIFT_HOST", "REDSHIFT_PORT", "REDSHIFT_DB", "REDSHIFT_USER",
             "REDSHIFT_PASSWORD", "REDSHIFT_FEDERATION_IAM_ROLE_ARN", "REPLICA_SECRET_ARN",
             "REPLICA_ENDPOINT", "REPLICA_PORT", "REPLICA_DB", "REPLICA_SCHEMA",
             # customer exports: s3://bucket/prefix, and the role Redshift's UNLOAD assumes
             "EXPORT_URI", "EXPORT_UNLOAD_IAM_ROLE_ARN"),
}
# how customer exports are written (platform_assets/exports.py): DuckDB COPY ... TO (reading
# the DuckDB file, or the PostgreSQL warehouse attached READ_ONLY), or Redshift UNLOAD
EXPORT_METHODS = {"local": "duckdb_copy", "pg": "duckdb_copy", "prod": "redshift_unload"}
# where exports go when EXPORT_URI is not set ("{local_dir}" = LOCAL_DIR); None = required
DEFAULT_EXPORT_URIS = {"local": "{local_dir}/exports", "pg": "{local_dir}/exports", "prod": None}
# whether .local/platform.env is consulted
READS_LOCAL_ENV_FILE = {"local": True, "pg": True, "prod": False}
# DAGSTER_EVENT_BATCH_SIZE unless set: the most events Dagster hands the event log at once
# (a batch ends earlier, with the partition range; 1000 days is nearly three years).
EVENT_BATCH_SIZE = 1000


class ConfigurationError(ValueError):
    """A platform setting is missing or malformed; the message names it."""


def _env_file_values(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                values[key.strip()] = value.strip()
    return values


@dataclass(frozen=True)
class PlatformSettings:
    env: str
    values: dict[str, str]

    @property
    def dbt_target(self) -> str:
        return DBT_TARGETS[self.env]

    @property
    def engine(self) -> str:
        return ENGINES[self.env]

    def get(self, name: str) -> str:
        value = self.values.get(name)
        if not value:
            hint = " (run `make up`, which writes .local/platform.env)" if READS_LOCAL_ENV_FILE[self.env] else ""
            raise ConfigurationError(f"{name} is not set; PLATFORM_ENV={self.env} needs it{hint}")
        return value

    def optional(self, name: str, default: str | None = None) -> str | None:
        return self.values.get(name) or default

    def dbt_env(self) -> dict[str, str]:
        """The variables handed to dbt subprocesses: the environment's required ones, and
        each password again as DBT_ENV_SECRET_<name> so that dbt scrubs it from its logs."""
        return {**{name: self.get(name) for name in REQUIRED_VARIABLES[self.env]}, **self.dbt_secret_env()}

    def dbt_secret_env(self) -> dict[str, str]:
        return {
            f"DBT_ENV_SECRET_{name}": self.values[name]
            for name in REQUIRED_VARIABLES[self.env]
            if name.endswith("PASSWORD") and self.values.get(name)
        }

    def export_for_subprocesses(self) -> None:
        """Make values read from .local/platform.env visible to dbt subprocesses.

        Variables already in the process environment are left as they are.
        """
        for name in REQUIRED_VARIABLES[self.env]:
            if name in self.values:
                os.environ.setdefault(name, self.values[name])
        # dbt replaces the value of every DBT_ENV_SECRET_* variable by ***** in its logs: the
        # pg target's user mapping DDL carries the replica password (federation macro).
        os.environ.update(self.dbt_secret_env())
        # Dagster hands the event log a run's planned events, and an asset's materializations
        # of a partition range (a daily backfill: 120 per asset), as one batch each only when
        # this is set; dagster-postgres stores a batch of materializations in one statement,
        # the local storage (instance_storage.py) any batch in one transaction per database.
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", str(EVENT_BATCH_SIZE))
        # dagster-dbt's manifest preparer looks for `dbt` on PATH: a process started as
        # .venv/bin/dagster (or pytest) without the venv activated must still find it.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])

    def check(self) -> None:
        """Fail fast, naming every missing variable at once."""
        missing = [n for n in REQUIRED_VARIABLES[self.env] if not self.values.get(n)]
        if missing:
            raise ConfigurationError(
                f"PLATFORM_ENV={self.env} needs these variables, which are not set: {', '.join(missing)}"
            )

    # -- scheduling knobs -------------------------------------------------------------------
    @property
    def observe_cron(self) -> str:
        return self.optional("SOURCE_OBSERVE_CRON", "*/5 * * * *")

    @property
    def partitions_start(self) -> str:
        # Fixed, not relative to today: moving the start would renumber every partition.
        raw = self.optional("FACT_PARTITIONS_START", "2025-11-01")
        try:
            return date.fromisoformat(raw).isoformat()
        except ValueError:
            raise ConfigurationError(f"FACT_PARTITIONS_START={raw!r} is not an ISO date (YYYY-MM-DD)") from None

    # -- customer exports --------------------------------------------------------------------
    @property
    def export_method(self) -> str:
        return EXPORT_METHODS[self.env]

    @property
    def export_uri(self) -> str:
        """Root of the customer exports: a local folder or s3://bucket/prefix (EXPORT_URI)."""
        default = DEFAULT_EXPORT_URIS[self.env]
        if default is None:
            raw = self.get("EXPORT_URI")
        else:
            local_dir = self.optional("LOCAL_DIR") or str(REPO_ROOT / ".local")
            raw = self.optional("EXPORT_URI") or default.format(local_dir=local_dir)
        if raw.startswith("file://"):
            raw = raw[len("file://"):]
        if "://" in raw and not raw.startswith("s3://"):
            raise ConfigurationError(f"EXPORT_URI={raw!r} must be a local folder or s3://bucket/prefix")
        if raw.startswith("s3://") and not raw[len("s3://"):].split("/", 1)[0]:
            raise ConfigurationError(f"EXPORT_URI={raw!r} names no bucket (s3://bucket/prefix)")
        if self.export_method == "redshift_unload" and not raw.startswith("s3://"):
            raise ConfigurationError(f"EXPORT_URI={raw!r}: Redshift UNLOAD writes to S3 only (s3://bucket/prefix)")
        return raw.rstrip("/")

    @property
    def max_replica_lag_seconds(self) -> float:
        raw = self.optional("MAX_REPLICA_LAG_SECONDS", "300")
        try:
            return float(raw)
        except ValueError:
            raise ConfigurationError(f"MAX_REPLICA_LAG_SECONDS={raw!r} is not a number") from None

    @property
    def dbt_warm_start(self) -> bool:
        """Whether dbt commands fork from a warm dbt process (platform_assets/dbt_warm.py)."""
        raw = self.optional("DBT_WARM_START", "1").strip().lower()
        if raw not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigurationError(f"DBT_WARM_START={raw!r}: use 1 (default) or 0")
        return raw in ("1", "true", "yes")


def load_settings(environ: dict[str, str] | None = None) -> PlatformSettings:
    environ = dict(os.environ if environ is None else environ)
    env = environ.get("PLATFORM_ENV") or "local"
    if env not in ENVIRONMENTS:
        raise ConfigurationError(
            f"PLATFORM_ENV={env!r} is not a known environment; valid: {', '.join(ENVIRONMENTS)}"
        )
    values: dict[str, str] = {}
    if READS_LOCAL_ENV_FILE[env]:
        local_dir = Path(environ.get("LOCAL_DIR") or REPO_ROOT / ".local")
        env_file = Path(environ.get("PLATFORM_ENV_FILE") or local_dir / "platform.env")
        values.update(_env_file_values(env_file))
    values.update({k: v for k, v in environ.items() if v != ""})
    return PlatformSettings(env=env, values=values)
