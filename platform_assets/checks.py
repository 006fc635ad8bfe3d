"""Platform checks on the federated sources (dbt's own tests become checks in dbt_assets).

`replica_lag` on every federated source: the replica's replay lag is at most
MAX_REPLICA_LAG_SECONDS. It runs with every observation (the observe job selects it) and
fails with ERROR severity above the setting. Automation (automation.py) does not refresh the
tables downstream of a source whose latest `replica_lag` failed: the marts would be rebuilt
from a replica that is behind the primary. When the lag recovers the next observation's
check passes and the held refreshes go ahead.

The check is deliberately not `blocking`: a blocking check that fails with ERROR severity
fails its run, and the run is the observation, which must still record what it saw. The hold
lives in the automation condition instead, where it is visible (labelled) in the UI.
"""


import dagster as dg

from .resources import ReplicaResource
from .settings import PlatformSettings
from .sources import FederatedTable

REPLICA_LAG_CHECK = "replica_lag"


def replica_lag_check_keys(tables: list[FederatedTable]) -> list[dg.AssetCheckKey]:
    return [dg.AssetCheckKey(t.key, REPLICA_LAG_CHECK) for t in tables]


def build_source_checks(tables: list[FederatedTable], settings: PlatformSettings) -> list[dg.AssetChecksDefinition]:
    max_lag = settings.max_replica_lag_seconds
    specs = [
        dg.AssetCheckSpec(
            REPLICA_LAG_CHECK,
            asset=t.key,
            description=(
                f"The replica's replay lag is at most {max_lag:g}s (MAX_REPLICA_LAG_SECONDS). Fails with "
                "ERROR severity above it; automation then holds the tables downstream."
            ),
        )
        for t in tables
    ]

    @dg.multi_asset_check(specs=specs, name="replica_lag_checks", can_subset=True)
    def replica_lag_checks(context: dg.AssetCheckExecutionContext, replica: ReplicaResource):
        lag = replica.replay_lag_seconds()
        passed = lag <= max_lag
        if not passed:
            context.log.warning(
                f"replica_lag failed: replay lag {lag:.1f}s > MAX_REPLICA_LAG_SECONDS={max_lag:g}; "
                "automation holds the marts until it recovers"
            )
        for key in context.selected_asset_check_keys:
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

    return [replica_lag_checks]
