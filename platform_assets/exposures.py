"""Dashboards as assets, from the dbt exposures (dbt/models/reporting/_exposures.yml).

dagster-dbt 0.29 makes assets of models, seeds and snapshots only (exposures are read for
dbt's node selection, never turned into specs), so the exposures become AssetSpecs here,
keyed `dashboards/<exposure name>`, downstream of the keys the dbt translator gives the
nodes in their `depends_on`.

The BI tool (Apache Superset, bi/) reads the reporting views and marts. A dashboard's data is
exactly as fresh as the stalest mart it reads: its FreshnessPolicy is the tightest of those
marts' policies (dbt `meta.freshness`, read through the views in between, which store nothing),
and `data_as_of` on each materialization is the time of the stalest.

With a BI server configured (SUPERSET_URL: `make bi` writes it locally) the dashboards are
materializable: a run provisions the selected ones from their definition (bi/dashboards.py;
idempotent), drops the cached results of their datasets and warms every chart, and automation
requests it after an upstream refresh. Without one they are external assets, and the
`dashboard_refresh` sensor records a (runless) materialization each time all of a dashboard's
marts have been rebuilt since the last one.
"""


import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg

from .bi import bi_package
from .dbt_assets import PlatformTranslator, freshness_meta
from .dbt_command import layer_of
from .settings import ConfigurationError, PlatformSettings

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


# resource field -> environment variable of the BI server (all required once SUPERSET_URL is
# set); PORTAL_ORIGINS: the origins that may embed the customer dashboard (commas or spaces)
SUPERSET_VARIABLES = {"url": "SUPERSET_URL", "username": "SUPERSET_SERVICE_USER",
                      "password": "SUPERSET_SERVICE_PASSWORD", "database_uri": "SUPERSET_DATABASE_URI",
                      "portal_origins": "PORTAL_ORIGINS"}


class SupersetResource(dg.ConfigurableResource):
    """The BI server, as the platform's service account: where the dashboards are provisioned."""

    url: str
    username: str
    password: str
    database_uri: str  # how Superset reads the warehouse (SQLAlchemy URI): locally the BI copy
    portal_origins: str
    public_url: str | None = None  # what a browser opens (SUPERSET_PUBLIC_URL), when not `url`

    def client(self):
        return bi_package().superset_api.SupersetClient(self.url, self.username, self.password)

    def origins(self) -> list[str]:
        return re.split(r"[,\s]+", self.portal_origins.strip()) if self.portal_origins.strip() else []


def superset_resource(settings: PlatformSettings) -> SupersetResource | None:
    """None without SUPERSET_URL. With it every variable is required (an empty PORTAL_ORIGINS
    would let any site embed the customer dashboard). The local BI copy (a `duckdb:` URI, what
    `make bi` writes into `.local/platform.env`) serves the local target only: on `pg`, which
    shares that file, the dashboards stay external."""
    if not settings.optional("SUPERSET_URL"):
        return None
    missing = [name for name in SUPERSET_VARIABLES.values() if not settings.optional(name)]
    if missing:
        raise ConfigurationError(f"SUPERSET_URL is set, so the dashboards also need {', '.join(missing)} "
                                 "(locally `make bi` writes them into .local/platform.env)")
    if settings.env != "local" and settings.get("SUPERSET_DATABASE_URI").startswith("duckdb:"):
        return None
    public = {"public_url": dg.EnvVar("SUPERSET_PUBLIC_URL")} if settings.optional("SUPERSET_PUBLIC_URL") else {}
    return SupersetResource(**{field: dg.EnvVar(name) for field, name in SUPERSET_VARIABLES.items()}, **public)


def dashboard_assets(dashboards: list[Dashboard], automation: dg.AutomationCondition,
                     upstream: Iterable[dg.AssetKey] = ()) -> dg.AssetsDefinition:
    """The dashboards as one subsettable asset: provision, drop cached results, warm, record.
    `upstream`: assets every dashboard also reads (locally the BI copy)."""
    definitions = bi_package().dashboards.by_exposure()
    if unknown := [d.name for d in dashboards if d.name not in definitions]:
        raise ConfigurationError(f"dashboard exposures with no definition in bi/dashboards.py: {', '.join(unknown)}")
    specs = [spec.replace_attributes(deps=[*spec.deps, *upstream], automation_condition=automation)
             for spec in dashboard_specs(dashboards)]

    @dg.multi_asset(name="dashboards", specs=specs, can_subset=True)
    def _dashboards(context: dg.AssetExecutionContext, superset: SupersetResource) -> Iterator[dg.MaterializeResult]:
        selected = [d for d in dashboards if d.key in context.selected_asset_keys]
        client = superset.client()
        origins = superset.origins()
        try:
            provisioned = client.provision(superset.database_uri, origins,
                                           tuple(definitions[d.name] for d in selected))
            # a chart must not serve a result cached from the data before this refresh
            client.invalidate(provisioned, f"refreshed by Dagster run {context.run.run_id}")
        except Exception as exc:
            raise superset_failure(superset, exc) from exc
        for d in selected:
            definition = definitions[d.name]
            started = time.monotonic()
            try:
                rows = client.warm(provisioned, definition)
            except Exception as exc:
                raise superset_failure(superset, exc, d.name) from exc
            built = inputs_built(context.instance, d)
            yield dg.MaterializeResult(asset_key=d.key, metadata={
                "url": dg.MetadataValue.url(f"{(superset.public_url or superset.url).rstrip('/')}"
                                            f"/superset/dashboard/{provisioned.dashboards[d.name]}/"),
                "charts": len(definition.charts),
                "rows_warmed": rows,
                "warm_seconds": round(time.monotonic() - started, 2),
                "embedded": definition.embedded,
                # what the portal is given as SUPERSET_EMBEDDED_UUID (its account cannot look it up)
                **({"embedded_uuid": provisioned.embedded[d.name]} if d.name in provisioned.embedded else {}),
                **({DATA_AS_OF: dg.MetadataValue.timestamp(min(built.values()))} if built else {}),
            })

    return _dashboards


def superset_failure(superset: SupersetResource, exc: Exception, dashboard: str | None = None) -> dg.Failure:
    """One readable line: which Superset (SUPERSET_URL), what failed; never a password."""
    what = f"warming the charts of {dashboard}" if dashboard else "provisioning the dashboards"
    hint = " Locally `make bi` starts it." if isinstance(exc, OSError) or "Connection" in type(exc).__name__ else ""
    return dg.Failure(description=f"{what} failed at Superset {superset.url} (SUPERSET_URL): "
                                  f"{type(exc).__name__}: {str(exc)[:500]}.{hint}")


def inputs_built(instance: dg.DagsterInstance, d: Dashboard) -> dict[dg.AssetKey, float] | None:
    """When each stored model a dashboard reads was last built; None while one never was
    (data_as_of is the stalest of these)."""
    built = {k: _latest_timestamp(instance, k) for k in d.marts}
    return built if built and None not in built.values() else None


def _latest_timestamp(instance: dg.DagsterInstance, key: dg.AssetKey) -> float | None:
    event = instance.get_latest_materialization_event(key)
    return event.timestamp if event else None


def dashboard_refreshes(instance: dg.DagsterInstance, dashboards: Iterable[Dashboard]) -> list[dg.AssetMaterialization]:
    """A materialization for each dashboard whose marts have all been rebuilt since its last one."""
    events = []
    for d in dashboards:
        built = inputs_built(instance, d)
        if built is None:
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

