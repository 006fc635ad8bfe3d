"""`make bench-bi`: COMPANIES (20) client companies load the embedded training dashboard at
once, ROUNDS (5) times each, against the running local stack (`make bi` after `make demo`).

Each company gets its own guest token from Superset, exactly as the portal requests it
(RLS `company_id = <id>`), then sends the dashboard's chart-data requests as the embedded
front end does (all charts of the dashboard in parallel). Reports p50/p95/max chart-data
latency and errors; target p95 <= 1 s, 0 errors. Results in bench/results/bi-load-*.json.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import requests

from bi import dashboards
from bi.__main__ import _servers, portal_environ
from bi.export_store import export_store
from bi.local import PORTAL_USER, load_or_create_secrets
from bi.portal import EMBEDDED_EXPOSURE
from bi.superset_api import SupersetClient

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> int:
    n_companies = int(os.environ.get("COMPANIES", "20"))
    rounds = int(os.environ.get("ROUNDS", "5"))
    env = portal_environ()
    superset, portal = _servers(env)
    if not superset.running_pid():
        raise SystemExit("Superset is not running: `make demo` (or `make bi`) first")
    provisioned = json.loads((superset.home / "provisioned.json").read_text())
    client = SupersetClient(superset.url, PORTAL_USER, load_or_create_secrets(superset.home)[
        "SUPERSET_PORTAL_PASSWORD"])
    embedded = provisioned["embedded"][EMBEDDED_EXPOSURE]
    dashboard = dashboards.by_exposure()[EMBEDDED_EXPOSURE]
    ids = export_store(portal.export_uri, env).companies()[:n_companies]
    tokens = {cid: client.guest_token(embedded, f"bench-{cid}", f"company_id = {cid}") for cid in ids}

    def body(chart) -> dict:
        ds = provisioned["datasets"][chart.dataset.key]
        return {"datasource": {"id": ds, "type": "table"}, "force": False,
                "queries": [{**chart.query, "filters": [], "extras": {"where": "", "having": ""}, "row_limit": 1000}],
                "form_data": {**chart.params, "viz_type": chart.viz_type, "datasource": f"{ds}__table",
                              "slice_id": provisioned["charts"][chart.uuid],
                              "dashboardId": provisioned["dashboards"][EMBEDDED_EXPOSURE]},
                "result_format": "json", "result_type": "full"}

    bodies = [body(c) for c in dashboard.charts]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one_chart(session: requests.Session, token: str, b: dict) -> None:
        t0 = time.perf_counter()
        try:
            r = session.post(f"{superset.url}/api/v1/chart/data", json=b, headers={"X-GuestToken": token}, timeout=60)
            ok, detail = r.status_code == 200, f"HTTP {r.status_code}"
        except requests.RequestException as e:
            ok, detail = False, str(e)
        with lock:
            latencies.append(time.perf_counter() - t0)
            if not ok:
                errors.append(detail)

    def company(cid: int) -> None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=len(bodies))
        session.mount("http://", adapter)
        with ThreadPoolExecutor(len(bodies)) as charts:  # a dashboard loads its charts in parallel
            for _ in range(rounds):
                list(charts.map(lambda b: one_chart(session, tokens[cid], b), bodies))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(company, ids))
    wall = time.perf_counter() - t0
    result = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"), "companies": len(ids), "rounds": rounds,
        "charts_per_dashboard": len(bodies), "requests": len(latencies), "errors": len(errors),
        "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3), "wall_s": round(wall, 1),
        "superset_workers": superset.workers, "superset_threads": superset.threads,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bi-load-{datetime.now(UTC):%Y%m%dT%H%M%S}.json").write_text(json.dumps(result, indent=1))
    print(f"embedded dashboard load: {result['companies']} companies x {rounds} loads x {len(bodies)} charts = "
          f"{result['requests']} chart-data requests in {wall:.1f}s; p50 {result['p50_s']}s, "
          f"p95 {result['p95_s']}s, max {result['max_s']}s; {result['errors']} errors (target p95 <= 1 s, 0 errors)")
    if errors:
        print("  first errors:", errors[:3])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
