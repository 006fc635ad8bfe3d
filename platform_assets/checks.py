"""The `replica_lag` check of every federated source (dbt's own tests become checks in dbt_assets).

It passes when the replica's replay lag is at most MAX_REPLICA_LAG_SECONDS and fails with
ERROR severity above it. Automation (automation.py) does not refresh the tables downstream
of a source whose latest `replica_lag` failed: the marts would be rebuilt from a replica
that is behind the primary. When the lag recovers the next observation's check passes and
the held refreshes go ahead.

The observation op (sources.py) reports it from the lag its own query read (run without the
sources, it reads the lag alone): a check in a step of its own would be skipped whenever the
observation records only some sources, and would read the lag a second time, so the two
could disagree. The check is not `blocking`: it must not fail the observation, which still
records what it saw; the hold lives in the automation condition, where it is visible
(labelled) in the UI.
"""

from collections.abc import Iterable, Iterator

import dagster as dg

REPLICA_LAG_CHECK = "replica_lag"


def replica_lag_check_keys(keys: Iterable[dg.AssetKey]) -> list[dg.AssetCheckKey]:
    return [dg.AssetCheckKey(key, REPLICA_LAG_CHECK) for key in keys]


def replica_lag_specs(keys: Iterable[dg.AssetKey], max_lag: float) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            REPLICA_LAG_CHECK,
            asset=key,
            description=(
                f"The replica's replay lag is at most {max_lag:g}s (MAX_REPLICA_LAG_SECONDS). Fails with "
                "ERROR severity above it; automation then holds the tables downstream."
            ),
        )
        for key in keys
    ]


def replica_lag_results(check_keys: Iterable[dg.AssetCheckKey], lag: float,
                        max_lag: float) -> Iterator[dg.AssetCheckResult]:
    passed = lag <= max_lag
    for key in check_keys:
        yield dg.AssetCheckResult(
            asset_key=key.asset_key,
            check_name=key.name,
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None if passed else (
                f"replay lag {lag:.1f}s exceeds MAX_REPLICA_LAG_SECONDS={max_lag:g}: refreshes from this "
                "source are held"
            ),
            metadata={"lag_seconds": dg.MetadataValue.float(round(lag, 3)),
                      "max_lag_seconds": dg.MetadataValue.float(max_lag)},
        )
