"""Platform checks on the federated sources (dbt's own tests become checks in dbt_assets)."""


import dagster as dg

from .settings import PlatformSettings
from .sources import FederatedTable, ReplicaResource

REPLICA_LAG_CHECK = "replica_lag"


def build_source_checks(tables: list[FederatedTable], settings: PlatformSettings) -> list[dg.AssetChecksDefinition]:
    max_lag = settings.max_replica_lag_seconds
    specs = [
        dg.AssetCheckSpec(
            REPLICA_LAG_CHECK,
            asset=t.key,
            description=f"The replica's replay lag is at most {max_lag:g}s (MAX_REPLICA_LAG_SECONDS).",
        )
        for t in tables
    ]

    @dg.multi_asset_check(specs=specs, name="replica_lag_checks", can_subset=True)
    def replica_lag_checks(context: dg.AssetCheckExecutionContext, replica: ReplicaResource):
        lag = replica.replay_lag_seconds()
        for key in context.selected_asset_check_keys:
            yield dg.AssetCheckResult(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=lag <= max_lag,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"lag_seconds": dg.MetadataValue.float(round(lag, 3)),
                          "max_lag_seconds": dg.MetadataValue.float(max_lag)},
            )

    return [replica_lag_checks]
