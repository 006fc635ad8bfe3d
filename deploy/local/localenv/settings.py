"""Settings of the local environment, read from environment variables in one place.

Every value has a documented default (README "Settings"); a malformed value raises an
error naming the variable, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


class SettingError(ValueError):
    """A setting (environment variable) is missing or malformed."""


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingError(f"{name}={value} must be at least {minimum}")
    return value


def remembered_ports(env_file: Path) -> dict[str, int]:
    """PRIMARY_PORT and REPLICA_PORT as the last `make up` wrote them (older files name the
    primary's port WAREHOUSE_PG_PORT only: the pg warehouse lives on the primary)."""
    from platform_assets.settings import env_file_values

    values = env_file_values(env_file)
    found = {"PRIMARY_PORT": values.get("PRIMARY_PORT") or values.get("WAREHOUSE_PG_PORT"),
             "REPLICA_PORT": values.get("REPLICA_PORT")}
    ports = {}
    for name, raw in found.items():
        if raw:
            if not raw.isdigit():
                raise SettingError(f"{name}={raw!r} in {env_file} is not a port number")
            ports[name] = int(raw)
    return ports


def _end(name: str) -> datetime:
    raw = os.environ.get(name)
    if not raw:
        # "Now", truncated to the hour so that two loads within the hour are identical.
        now = datetime.utcnow()
        return now.replace(minute=0, second=0, microsecond=0)
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not an ISO timestamp (e.g. 2026-11-26T00:00)") from None


@dataclass(frozen=True)
class LocalSettings:
    """Where the local primary and replica live and how big the demo data is."""

    local_dir: Path
    primary_port: int = 54320
    replica_port: int = 54321
    events: int = 300_000
    days: int = 120
    seed: int = 42
    end: datetime = field(default_factory=lambda: _end("DEMO_END"))

    @property
    def pg_dir(self) -> Path:
        return self.local_dir / "pg"

    @property
    def env_file(self) -> Path:
        return self.local_dir / "platform.env"

    @classmethod
    def from_env(cls) -> LocalSettings:
        local_dir = Path(os.environ.get("LOCAL_DIR") or REPO_ROOT / ".local").resolve()
        # The ports `make up` chose are remembered in platform.env: a later command in a shell
        # without PRIMARY_PORT/REPLICA_PORT reaches the same servers. A variable set wins.
        remembered = remembered_ports(local_dir / "platform.env")
        primary = _int("PRIMARY_PORT", remembered.get("PRIMARY_PORT", 54320), 1024)
        replica = _int("REPLICA_PORT", remembered.get("REPLICA_PORT", 54321), 1024)
        if primary == replica:
            raise SettingError(f"PRIMARY_PORT and REPLICA_PORT are both {primary}")
        return cls(
            local_dir=local_dir,
            primary_port=primary,
            replica_port=replica,
            events=_int("EVENTS", 300_000, 1),
            days=_int("DAYS", 120, 1),
            seed=_int("SEED", 42),
            end=_end("DEMO_END"),
        )
