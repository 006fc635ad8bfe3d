"""The dashboards as code: datasets, charts and dashboards, rendered into Superset's own
import format (a zip of YAML files, `POST /api/v1/dashboard/import/`).

One dashboard per dbt exposure of type dashboard (dbt/models/reporting/_exposures.yml stays
the lineage's source of truth; `exposure` names it). Every object has a fixed UUID derived
from its name, so importing again with `overwrite` updates in place: provisioning is
idempotent. A dashboard marked `embedded` is shown to customers through guest tokens whose
RLS clause names their company: each of its datasets must carry `COMPANY_COLUMN`
(`check_embeddable` refuses it otherwise). The internal dashboards are never embedded.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Any

import yaml

COMPANY_COLUMN = "company_id"
DATABASE_NAME = "warehouse (BI copy)"
_NS = uuid.UUID("6f1c8f2e-3d5a-4c41-9a59-2b8e1f0c7d25")


def uid(kind: str, name: str) -> str:
    return str(uuid.uuid5(_NS, f"{kind}:{name}"))


@dataclass(frozen=True)
class Dataset:
    schema: str
    table: str
    columns: dict[str, str]  # name -> type: all Superset knows of the table, so all it can query
    dttm: str | None = None

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def uuid(self) -> str:
        return uid("dataset", self.key)


def metric(sql: str, label: str) -> dict[str, Any]:
    return {"expressionType": "SQL", "sqlExpression": sql, "label": label, "hasCustomLabel": True,
            "optionName": f"metric_{label.replace(' ', '_')}"}


@dataclass(frozen=True)
class Chart:
    name: str
    dataset: Dataset
    viz_type: str
    params: dict[str, Any]
    # What the chart's query asks for (the guest-payload check compares a guest's request
    # with these): metrics, columns and orderby of its one query.
    query: dict[str, Any]
    width: int = 4
    height: int = 50

    @property
    def uuid(self) -> str:
        return uid("chart", self.name)


@dataclass(frozen=True)
class Dashboard:
    exposure: str
    title: str
    slug: str
    rows: tuple[tuple[Chart, ...], ...]
    embedded: bool = False
    description: str = ""

    @property
    def uuid(self) -> str:
        return uid("dashboard", self.exposure)

    @property
    def charts(self) -> list[Chart]:
        return [c for row in self.rows for c in row]

    @property
    def datasets(self) -> list[Dataset]:
        return list({c.dataset.key: c.dataset for c in self.charts}.values())


TIME_AXIS = {"x_axis_time_format": "smart_date", "time_grain_sqla": "P1D"}


def big_number(name: str, ds: Dataset, sql: str, label: str, fmt: str = ",d") -> Chart:
    m = metric(sql, label)
    return Chart(name, ds, "big_number_total",
                 {"metric": m, "adhoc_filters": [], "header_font_size": 0.4, "subheader_font_size": 0.15,
                  "y_axis_format": fmt, "subheader": ""},
                 {"metrics": [m], "columns": [], "orderby": []}, width=3, height=30)


def table(name: str, ds: Dataset, columns: list[str], order_by: str, width: int = 12, height: int = 50) -> Chart:
    return Chart(name, ds, "table",
                 {"query_mode": "raw", "all_columns": columns, "order_by_cols": [json.dumps([order_by, True])],
                  "row_limit": 1000, "server_pagination": False, "adhoc_filters": [],
                  "table_timestamp_format": "smart_date", "include_search": False},
                 {"metrics": [], "columns": columns, "orderby": [[order_by, True]]}, width=width, height=height)


def grouped_table(name: str, ds: Dataset, groupby: list[str], metrics: list[dict], width: int = 6) -> Chart:
    return Chart(name, ds, "table",
                 {"query_mode": "aggregate", "groupby": groupby, "metrics": metrics, "all_columns": [],
                  "row_limit": 1000, "server_pagination": False, "adhoc_filters": [], "order_desc": True,
                  "timeseries_limit_metric": metrics[0], "include_search": False},
                 {"metrics": metrics, "columns": groupby, "orderby": [[metrics[0], False]]},
                 width=width, height=50)


def timeseries(name: str, ds: Dataset, x: str, metrics: list[dict], groupby: list[str] | None = None,
               viz: str = "echarts_timeseries_bar", grain: str = "P1D", width: int = 12) -> Chart:
    axis = {"timeGrain": grain, "columnType": "BASE_AXIS", "sqlExpression": x, "label": x,
            "expressionType": "SQL"}
    return Chart(name, ds, viz,
                 {"x_axis": x, "time_grain_sqla": grain, "metrics": metrics, "groupby": groupby or [],
                  "adhoc_filters": [{"clause": "WHERE", "subject": x, "operator": "TEMPORAL_RANGE",
                                     "comparator": "No filter", "expressionType": "SIMPLE"}],
                  "row_limit": 10000, "x_axis_time_format": "smart_date", "y_axis_format": "SMART_NUMBER",
                  "stack": bool(groupby), "show_legend": bool(groupby), "rich_tooltip": True,
                  "orientation": "vertical", "truncate_metric": True},
                 {"metrics": metrics, "columns": [axis, *(groupby or [])], "orderby": [[metrics[0], False]]},
                 width=width, height=50)


# -- the datasets: the reporting views (and one mart), as the BI copy holds them -------------
# A customer sees its own plan and seats, not what it pays (current_mrr is not declared).
OVERVIEW = Dataset("reporting", "rpt_company_training_overview", {
    "company_id": "BIGINT", "company_name": "VARCHAR", "current_plan": "VARCHAR", "seats": "INTEGER",
    "active_users": "BIGINT", "enrollments": "BIGINT", "completed_enrollments": "BIGINT",
    "certificates": "BIGINT", "active_learners_30d": "BIGINT", "learning_hours_30d": "DOUBLE",
    "completion_rate": "DOUBLE"})
DAILY = Dataset("marts", "fct_daily_learning_activity", {
    "company_id": "BIGINT", "course_id": "BIGINT", "activity_date": "DATE", "active_learners": "BIGINT",
    "sessions": "BIGINT", "learning_seconds": "BIGINT", "lessons_completed": "BIGINT"}, dttm="activity_date")
MRR = Dataset("reporting", "rpt_monthly_recurring_revenue", {
    "month_start": "DATE", "plan": "VARCHAR", "paying_companies": "BIGINT", "mrr": "DECIMAL", "arr": "DECIMAL",
    "new_mrr": "DECIMAL", "expansion_mrr": "DECIMAL", "contraction_mrr": "DECIMAL", "churned_mrr": "DECIMAL",
    "net_new_mrr": "DECIMAL"}, dttm="month_start")
ENGAGEMENT = Dataset("reporting", "rpt_content_engagement", {
    "course_id": "BIGINT", "course_title": "VARCHAR", "course_category": "VARCHAR", "enrollments": "BIGINT",
    "completion_rate": "DOUBLE", "certificates": "BIGINT", "active_learners_30d": "BIGINT",
    "avg_minutes_per_session_30d": "DOUBLE"})

DASHBOARDS = (
    Dashboard(
        exposure="customer_training_dashboard", title="Training overview", slug="customer-training",
        embedded=True,
        description="Embedded in the product, one company per viewer (guest token with an RLS clause).",
        rows=(
            (big_number("Enrollments", OVERVIEW, "SUM(enrollments)", "enrollments"),
             big_number("Completed enrollments", OVERVIEW, "SUM(completed_enrollments)", "completed"),
             big_number("Certificates", OVERVIEW, "SUM(certificates)", "certificates"),
             big_number("Learning hours, last 30 days", OVERVIEW, "SUM(learning_hours_30d)", "hours", ",.1f")),
            (table("Company overview", OVERVIEW,
                   ["company_id", "company_name", "current_plan", "seats", "active_users", "enrollments",
                    "completed_enrollments", "certificates", "active_learners_30d"], "company_id", height=20),),
            (timeseries("Daily learning hours", DAILY, "activity_date",
                        [metric("SUM(learning_seconds) / 3600.0", "learning hours")]),),
        ),
    ),
    Dashboard(
        exposure="revenue_mrr_dashboard", title="Revenue and MRR (internal)", slug="revenue-mrr",
        rows=(
            (timeseries("MRR by month and plan", MRR, "month_start", [metric("SUM(mrr)", "MRR")], ["plan"],
                        grain="P1M", width=8),
             grouped_table("MRR by plan", MRR, ["plan"], [metric("SUM(mrr)", "MRR")], width=4)),
            (timeseries("Paying companies", MRR, "month_start",
                        [metric("SUM(paying_companies)", "paying companies")], viz="echarts_timeseries_line",
                        grain="P1M"),),
        ),
    ),
    Dashboard(
        exposure="content_engagement_dashboard", title="Content engagement (internal)", slug="content-engagement",
        rows=(
            (grouped_table("Enrollments by category", ENGAGEMENT, ["course_category"],
                           [metric("SUM(enrollments)", "enrollments"), metric("SUM(certificates)", "certificates")]),
             grouped_table("Active learners by category", ENGAGEMENT, ["course_category"],
                           [metric("SUM(active_learners_30d)", "active learners 30d")])),
            (table("Courses", ENGAGEMENT, ["course_title", "course_category", "enrollments", "completion_rate",
                                           "certificates", "active_learners_30d", "avg_minutes_per_session_30d"],
                   "course_title"),),
        ),
    ),
)


def by_exposure() -> dict[str, Dashboard]:
    return {d.exposure: d for d in DASHBOARDS}


def check_embeddable(dashboard: Dashboard) -> None:
    """An embedded dashboard's every dataset carries the company column its RLS clause needs."""
    missing = [d.key for d in dashboard.datasets if COMPANY_COLUMN not in d.columns]
    if dashboard.embedded and missing:
        raise ValueError(f"{dashboard.exposure} is embedded for customers but these datasets have no "
                         f"{COMPANY_COLUMN} column for the RLS clause: {missing}")


def relations() -> list[tuple[str, str]]:
    """What the BI copy must hold: every dataset of every dashboard."""
    return sorted({(ds.schema, ds.table) for d in DASHBOARDS for ds in d.datasets})


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _database(sqlalchemy_uri: str) -> dict[str, Any]:
    return {
        "database_name": DATABASE_NAME, "sqlalchemy_uri": sqlalchemy_uri, "cache_timeout": None,
        "expose_in_sqllab": False, "allow_run_async": False, "allow_ctas": False, "allow_cvas": False,
        "allow_dml": False, "allow_file_upload": False,
        # the BI copy is opened read-only: several readers, and it is replaced, never written
        "extra": {"engine_params": {"connect_args": {"read_only": True}}, "allows_virtual_table_explore": False},
        "uuid": uid("database", DATABASE_NAME), "version": "1.0.0",
    }


def _dataset(ds: Dataset) -> dict[str, Any]:
    return {
        "table_name": ds.table, "main_dttm_col": ds.dttm, "description": None, "default_endpoint": None,
        "offset": 0, "cache_timeout": None, "schema": ds.schema, "sql": None, "params": None,
        "template_params": None, "filter_select_enabled": True, "fetch_values_predicate": None, "extra": None,
        "normalize_columns": False, "always_filter_main_dttm": False, "uuid": ds.uuid,
        "metrics": [{"metric_name": "count", "verbose_name": "COUNT(*)", "metric_type": "count",
                     "expression": "COUNT(*)", "description": None, "d3format": None, "currency": None,
                     "extra": None, "warning_text": None}],
        "columns": [{"column_name": name, "verbose_name": None, "is_dttm": name == ds.dttm, "is_active": True,
                     "type": type_, "advanced_data_type": None, "groupby": True, "filterable": True,
                     "expression": None, "description": None, "python_date_format": None, "extra": None}
                    for name, type_ in ds.columns.items()],
        "version": "1.0.0", "database_uuid": uid("database", DATABASE_NAME),
    }


def _chart(c: Chart) -> dict[str, Any]:
    params = {"viz_type": c.viz_type, **c.params}
    query_context = {"datasource": {"type": "table"}, "force": False,
                     "queries": [c.query], "form_data": params, "result_format": "json", "result_type": "full"}
    return {"slice_name": c.name, "description": None, "certified_by": None, "certification_details": None,
            "viz_type": c.viz_type, "params": params, "query_context": json.dumps(query_context),
            "cache_timeout": None, "uuid": c.uuid, "version": "1.0.0", "dataset_uuid": c.dataset.uuid}


def _position(d: Dashboard) -> dict[str, Any]:
    position: dict[str, Any] = {
        "DASHBOARD_VERSION_KEY": "v2",
        "ROOT_ID": {"type": "ROOT", "id": "ROOT_ID", "children": ["GRID_ID"]},
        "GRID_ID": {"type": "GRID", "id": "GRID_ID", "children": [], "parents": ["ROOT_ID"]},
        "HEADER_ID": {"id": "HEADER_ID", "type": "HEADER", "meta": {"text": d.title}},
    }
    for r, row in enumerate(d.rows):
        row_id = f"ROW-{r}"
        position["GRID_ID"]["children"].append(row_id)
        position[row_id] = {"type": "ROW", "id": row_id, "children": [], "parents": ["ROOT_ID", "GRID_ID"],
                            "meta": {"background": "BACKGROUND_TRANSPARENT"}}
        for i, c in enumerate(row):
            chart_id = f"CHART-{r}-{i}"
            position[row_id]["children"].append(chart_id)
            position[chart_id] = {"type": "CHART", "id": chart_id, "children": [],
                                  "parents": ["ROOT_ID", "GRID_ID", row_id],
                                  "meta": {"width": c.width, "height": c.height, "uuid": c.uuid,
                                           "sliceName": c.name, "chartId": 0}}
    return position


def _dashboard(d: Dashboard) -> dict[str, Any]:
    return {
        "dashboard_title": d.title, "description": d.description or None, "css": "", "slug": d.slug,
        "certified_by": None, "certification_details": None, "published": True, "uuid": d.uuid,
        "position": _position(d),
        "metadata": {"color_scheme": "", "refresh_frequency": 0, "expanded_slices": {}, "label_colors": {},
                     "timed_refresh_immune_slices": [], "cross_filters_enabled": False,
                     "native_filter_configuration": [], "shared_label_colors": [], "color_scheme_domain": []},
        "version": "1.0.0",
    }


def import_bundle(sqlalchemy_uri: str, dashboards: tuple[Dashboard, ...] = DASHBOARDS) -> bytes:
    """The zip `POST /api/v1/dashboard/import/` takes: every dashboard with its charts,
    datasets and the database (its URI is the installation's, the rest is fixed)."""
    for d in dashboards:
        check_embeddable(d)
    root = "platform_dashboards"
    files = {f"{root}/metadata.yaml": _dump({"version": "1.0.0", "type": "Dashboard",
                                              "timestamp": "2026-12-06T00:00:00+00:00"}),
             f"{root}/databases/warehouse.yaml": _dump(_database(sqlalchemy_uri))}
    for d in dashboards:
        files[f"{root}/dashboards/{d.slug}.yaml"] = _dump(_dashboard(d))
        for c in d.charts:
            files[f"{root}/charts/{c.uuid}.yaml"] = _dump(_chart(c))
            files[f"{root}/datasets/warehouse/{c.dataset.table}.yaml"] = _dump(_dataset(c.dataset))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in sorted(files.items()):
            # a fixed date: the same definition gives the same bytes (make bi compares digests)
            zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), text)
    return buffer.getvalue()


@dataclass
class Provisioned:
    """What Superset assigned on import: ids by our names."""

    dashboards: dict[str, int] = field(default_factory=dict)  # exposure -> id
    charts: dict[str, int] = field(default_factory=dict)  # chart uuid -> id
    datasets: dict[str, int] = field(default_factory=dict)  # "schema.table" -> id
    embedded: dict[str, str] = field(default_factory=dict)  # exposure -> embedded uuid
