"""The platform's configuration: one environment switch and the variables it needs.

`PLATFORM_ENV` = local | pg | prod resolves the dbt target and every resource. Every
environment appears in every map below; an unknown environment or a missing variable is an
error naming it, never a silent fallback.

For the local environments (local, pg) `.local/platform.env` (written by `make up`) is the
local stand-in for a task definition's environment: `load_settings()` loads it into the
process environment once, with python-dotenv (variables already set win), so that EnvVar
resources and the dbt processes dagster-dbt starts see the same values as the settings.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from dotenv import dotenv_values, load_dotenv

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


class ConfigurationError(ValueError):
    """A platform setting is missing or malformed; the message names it."""


def env_file_values(path: Path) -> dict[str, str]:
    """The KEY=value pairs of a platform.env file (none when it does not exist)."""
    return {k: v for k, v in dotenv_values(path).items() if v is not None} if path.exists() else {}


@contextmanager
def held(lock: Path) -> Iterator[None]:
    """An exclusive lock on the file `lock` while the block runs: local state that processes
    starting at once share (the dbt preparation, the BI secrets) is made by one of them."""
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


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

    def number(self, name: str, default: int | float, kind: type = int, minimum: int | float = 1) -> int | float:
        """A count or duration setting: a number of `kind` of at least `minimum`, or an error naming it."""
        raw = self.optional(name, str(default))
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise ConfigurationError(
                f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number of at least {minimum}")
        return value



def env_file_path(environ: dict[str, str]) -> Path:
    local_dir = Path(environ.get("LOCAL_DIR") or REPO_ROOT / ".local")
    return Path(environ.get("PLATFORM_ENV_FILE") or local_dir / "platform.env")


def load_settings(environ: dict[str, str] | None = None) -> PlatformSettings:
    """The settings of `environ`, or of this process: then, for a local environment,
    `.local/platform.env` is first loaded into the process environment (see the module
    docstring); a given `environ` (tests, tools) is read without touching it."""
    if environ is None:
        if READS_LOCAL_ENV_FILE.get(os.environ.get("PLATFORM_ENV") or "local"):
            load_dotenv(env_file_path(dict(os.environ)), override=False)
        # dbt prints ***** for the value of every DBT_ENV_SECRET_* variable (the pg target's
        # user mapping DDL carries the replica password), whoever set the password.
        for name in ("REPLICA_PASSWORD", "WAREHOUSE_PG_PASSWORD", "REDSHIFT_PASSWORD"):
            if os.environ.get(name):
                os.environ.setdefault(f"DBT_ENV_SECRET_{name}", os.environ[name])
    environ = dict(os.environ if environ is None else environ)
    env = environ.get("PLATFORM_ENV") or "local"
    if env not in ENVIRONMENTS:
        raise ConfigurationError(
            f"PLATFORM_ENV={env!r} is not a known environment; valid: {', '.join(ENVIRONMENTS)}"
        )
    values: dict[str, str] = {}
    if READS_LOCAL_ENV_FILE[env]:
        values.update(env_file_values(env_file_path(environ)))
    values.update({k: v for k, v in environ.items() if v != ""})
    return PlatformSettings(env=env, values=values)
