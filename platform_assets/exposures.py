"""Dashboards as assets, from the dbt exposures (dbt/models/reporting/_exposures.yml).

dagster-dbt 0.29 makes assets of models, seeds and snapshots only (exposures are read for
dbt's node selection, never turned into specs), so the exposures become AssetSpecs here,
keyed `dashboards/<exposure name>`, downstream of the keys the dbt translator gives the
nodes in their `depends_on`.

The BI tool (Apache Superset, bi/) reads the reporting views and marts: Dagster does not build
a dashboard, so a dashboard is an external asset. Its data is exactly as fresh as the
stalest mart it reads, which is how it is tracked:
- its FreshnessPolicy is the tightest of those marts' policies (dbt `meta.freshness`, read
  through the views in between, which store nothing);
- the `dashboard_refresh` sensor records a (runless) materialization of a dashboard each time
  all of its marts have been rebuilt since the last one, with the time of the stalest
  (`data_as_of`): a mart that stops refreshing makes its dashboards fail freshness too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from .dbt_assets import PlatformTranslator, freshness_meta
from .dbt_command import layer_of

DASHBOARDS_GROUP = "dashboards"
# The BI tool the exposures are built in (bi/dashboards.py; README, "Dashboards and the customer portal").
BI_TOOL = "superset"
STORED_LAYERS = ("marts", "snapshots")
DATA_AS_OF = "data_as_of"


@dataclass(frozen=True)
class Dashboard:
    key: dg.AssetKey
    name: str
    url: str
    owner: str | None
    maturity: str | None
    deps: tuple[dg.AssetKey, ...]  # the exposure's depends_on, as asset keys
    marts: tuple[dg.AssetKey, ...]  # the stored models it reads, through the views
    policy: dg.FreshnessPolicy
    description: str


def _node(manifest: Mapping[str, Any], unique_id: str) -> Mapping[str, Any]:
    for collection in ("nodes", "sources", "exposures"):
        if unique_id in manifest.get(collection, {}):
            return manifest[collection][unique_id]
    raise KeyError(unique_id)


def _is_stored(props: Mapping[str, Any]) -> bool:
    if props["resource_type"] == "snapshot":
        return True
    return props["resource_type"] == "model" and props.get("config", {}).get("materialized") not in (
        "view", "ephemeral",
    )


def stored_inputs(manifest: Mapping[str, Any], unique_ids: Iterable[str]) -> list[Mapping[str, Any]]:
    """The stored models reached from these nodes, looking through views and ephemerals."""
    found: dict[str, Mapping[str, Any]] = {}
    queue, seen = list(unique_ids), set()
    while queue:
        uid = queue.pop()
        if uid in seen:
            continue
        seen.add(uid)
        props = _node(manifest, uid)
        if _is_stored(props):
            found[uid] = props
        elif props["resource_type"] == "model":
            queue.extend(props.get("depends_on", {}).get("nodes", []))
    return [found[k] for k in sorted(found)]


def tightest_policy(inputs: Iterable[Mapping[str, Any]]) -> dg.FreshnessPolicy:
    """A policy no looser than any input's: the smallest warn and fail windows among them."""
    windows = [freshness_meta(p) for p in inputs if layer_of(p) in STORED_LAYERS] or [freshness_meta({})]
    fail = min(float(w["fail_after_hours"]) for w in windows)
    warn = min(float(w["warn_after_hours"]) for w in windows)
    return dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=fail), warn_window=timedelta(hours=min(warn, fail))
    )


def dashboards_from_manifest(manifest: Mapping[str, Any], translator: PlatformTranslator) -> list[Dashboard]:
    dashboards = []
    for exposure in sorted(manifest.get("exposures", {}).values(), key=lambda e: e["name"]):
        if exposure.get("type") != "dashboard":
            continue
        parents = exposure.get("depends_on", {}).get("nodes", [])
        deps = tuple(
            sorted({translator.get_asset_key(_node(manifest, uid)) for uid in parents}, key=lambda k: k.path)
        )
        inputs = stored_inputs(manifest, parents)
        owner = (exposure.get("owner") or {}).get("email")
        dashboards.append(
            Dashboard(
                key=dg.AssetKey([DASHBOARDS_GROUP, exposure["name"]]),
                name=exposure["name"],
                url=exposure.get("url") or "",
                owner=owner,
                maturity=exposure.get("maturity"),
                deps=deps,
                marts=tuple(translator.get_asset_key(p) for p in inputs),
                policy=tightest_policy(inputs),
                description=(exposure.get("description") or "").strip()
                or f"{BI_TOOL} dashboard {exposure.get('label') or exposure['name']}",
            )
        )
    return dashboards


def dashboard_specs(dashboards: Iterable[Dashboard]) -> list[dg.AssetSpec]:
    return [
        dg.AssetSpec(
            key=d.key,
            deps=list(d.deps),
            description=d.description,
            group_name=DASHBOARDS_GROUP,
            kinds={BI_TOOL, "dashboard"},
            owners=[d.owner] if d.owner else [],
            freshness_policy=d.policy,
            tags={"layer": "dashboards", **({"maturity": d.maturity} if d.maturity else {})},
            metadata={
                "url": dg.MetadataValue.url(d.url) if d.url else dg.MetadataValue.text("n/a"),
                "bi_tool": BI_TOOL,
                "reads_marts": dg.MetadataValue.json([k.to_user_string() for k in d.marts]),
            },
        )
        for d in dashboards
    ]


def _latest_timestamp(instance: dg.DagsterInstance, key: dg.AssetKey) -> float | None:
    event = instance.get_latest_materialization_event(key)
    return event.timestamp if event else None


def dashboard_refreshes(instance: dg.DagsterInstance, dashboards: Iterable[Dashboard]) -> list[dg.AssetMaterialization]:
    """A materialization for each dashboard whose marts have all been rebuilt since its last one."""
    events = []
    for d in dashboards:
        built = {k: _latest_timestamp(instance, k) for k in d.marts}
        if not built or any(ts is None for ts in built.values()):
            continue  # a mart it reads was never built: nothing to show yet
        as_of = min(built.values())
        last = instance.get_latest_materialization_event(d.key)
        previous = None
        if last and last.asset_materialization:
            value = last.asset_materialization.metadata.get(DATA_AS_OF)
            previous = value.value if value is not None else None
        if previous is not None and as_of <= previous:
            continue
        events.append(
            dg.AssetMaterialization(
                asset_key=d.key,
                description=f"all marts of {d.name} rebuilt; its data is as of the stalest",
                metadata={
                    DATA_AS_OF: dg.MetadataValue.timestamp(as_of),
                    "inputs_built_at": dg.MetadataValue.json({
                        k.to_user_string(): datetime.fromtimestamp(ts, UTC).isoformat()
                        for k, ts in sorted(built.items(), key=lambda kv: kv[0].path)
                    }),
                    "url": dg.MetadataValue.url(d.url) if d.url else dg.MetadataValue.text("n/a"),
                },
            )
        )
    return events


def dashboard_refresh_sensor(dashboards: list[Dashboard]) -> dg.SensorDefinition:
    @dg.sensor(
        name="dashboard_refresh",
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Records a dashboard as refreshed once every mart it reads has been rebuilt "
        "(data_as_of = the stalest); its freshness policy then tracks its inputs.",
    )
    def _dashboard_refresh(context: dg.SensorEvaluationContext):
        events = dashboard_refreshes(context.instance, dashboards)
        if not events:
            return dg.SkipReason("no dashboard has newer data")
        return dg.SensorResult(asset_events=events)

    return _dashboard_refresh

