"""The customers' side end to end, against a real Superset and the real portal: company A
signs in (in Chromium) and its embedded dashboard renders with A's figures and none of B's;
A's guest token cannot be stretched to other rows, charts, datasets, SQL Lab or the dataset
lists; the export API answers 401 / 403 / refuses path tampering and serves A's file as is."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import sync_playwright

from bi import dashboards
from bi.dashboards import check_embeddable, uid
from bi.portal import EMBEDDED_EXPOSURE

from ..platform.test_ui_browser import CHROMIUM_ARGS, chromium_executable

CUSTOMER = dashboards.by_exposure()[EMBEDDED_EXPOSURE]
OVERVIEW_TABLE = next(c for c in CUSTOMER.charts if c.name == "Company overview")
MRR_CHART = next(c for d in dashboards.DASHBOARDS for c in d.charts if c.name == "MRR by month and plan")


def signed_in(stack, company_id: int) -> requests.Session:
    session = requests.Session()
    user, password = stack.user(company_id)
    r = session.post(f"{stack.portal.url}/login", data={"username": user, "password": password},
                     allow_redirects=False, timeout=30)
    assert r.status_code == 303, r.text
    return session


def guest_token(stack, company_id: int) -> str:
    r = signed_in(stack, company_id).post(f"{stack.portal.url}/api/guest-token", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["token"]


def chart_request(stack, chart, dashboard_exposure: str = EMBEDDED_EXPOSURE, dataset_key: str | None = None,
                  **query_changes) -> dict:
    """The chart-data request the embedded front end sends for `chart` (and edits of it)."""
    dataset_id = stack.provisioned.datasets[dataset_key or chart.dataset.key]
    query = {**chart.query, "filters": [], "extras": {"where": "", "having": ""}, "row_limit": 1000,
             **query_changes}
    return {
        "datasource": {"id": dataset_id, "type": "table"},
        "force": False,
        "queries": [query],
        "form_data": {**chart.params, "viz_type": chart.viz_type, "datasource": f"{dataset_id}__table",
                      "slice_id": stack.provisioned.charts[chart.uuid],
                      "dashboardId": stack.provisioned.dashboards[dashboard_exposure]},
        "result_format": "json", "result_type": "full",
    }


def post_chart_data(stack, token: str, body: dict) -> requests.Response:
    return requests.post(f"{stack.superset.url}/api/v1/chart/data", json=body, timeout=60,
                         headers={"X-GuestToken": token, "Referer": stack.portal.url})


def overview_rows(stack, company_id: int) -> list[dict]:
    columns = OVERVIEW_TABLE.query["columns"]
    rows = stack.query(f"select {', '.join(columns)} from reporting.rpt_company_training_overview "
                       "where company_id = ?", [company_id])
    return [dict(zip(columns, r, strict=True)) for r in rows]


def test_company_a_sees_its_embedded_dashboard_in_chromium(bi_stack, tmp_path):
    a, b = bi_stack.companies
    mart_a, mart_b = overview_rows(bi_stack, a)[0], overview_rows(bi_stack, b)[0]
    user, password = bi_stack.user(a)
    chart_responses: list[tuple[int, str]] = []
    screenshot = tmp_path / "portal.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1300}).new_page()
            page.set_default_timeout(90_000)
            page.on("response", lambda r: chart_responses.append((r.status, r.url))
                    if "/api/v1/chart/data" in r.url else None)
            page.goto(f"{bi_stack.portal.url}/")
            page.fill("input[name=username]", user)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            frame = page.frame_locator("#dashboard iframe")
            # the table chart shows A's row: its name, and its enrollments figure
            frame.get_by_text(mart_a["company_name"], exact=True).first.wait_for()
            frame.get_by_text("Daily learning hours").first.wait_for()
            page.wait_for_function(
                "(n) => performance.getEntriesByType('resource').length > 0", arg=0)
            frame.locator("canvas, svg").first.wait_for()  # the trend is drawn
            page.wait_for_timeout(1500)  # the remaining charts settle
            page.screenshot(path=str(screenshot), full_page=True)
            text = frame.locator("body").inner_text()
            figures = [line.strip() for line in text.splitlines()]
        finally:
            browser.close()
    context = f"screenshot {screenshot}; chart responses {chart_responses}"
    assert mart_b["company_name"] not in text, context
    assert f"{mart_a['enrollments']:,}" in figures, (figures, context)
    assert f"{mart_a['certificates']:,}" in figures, (figures, context)
    assert len(chart_responses) >= len(CUSTOMER.charts), context
    assert all(status == 200 for status, _ in chart_responses), context


def test_a_guest_token_returns_only_company_a_rows_whatever_the_request(bi_stack):
    a, b = bi_stack.companies
    token = guest_token(bi_stack, a)

    r = post_chart_data(bi_stack, token, chart_request(bi_stack, OVERVIEW_TABLE))
    assert r.status_code == 200, r.text
    data = r.json()["result"][0]["data"]
    assert data == overview_rows(bi_stack, a), data
    # the same request with B's token: B's row (results are cached per RLS clause)
    r = post_chart_data(bi_stack, guest_token(bi_stack, b), chart_request(bi_stack, OVERVIEW_TABLE))
    assert r.status_code == 200, r.text
    assert r.json()["result"][0]["data"] == overview_rows(bi_stack, b)

    # filters edited to ask for B: the RLS clause still holds, nothing of B comes back
    edited = chart_request(bi_stack, OVERVIEW_TABLE,
                           filters=[{"col": "company_id", "op": "IN", "val": [b]}])
    r = post_chart_data(bi_stack, token, edited)
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert all(row["company_id"] == a for row in r.json()["result"][0]["data"])
    # a where clause that tries to widen the set
    widened = chart_request(bi_stack, OVERVIEW_TABLE, extras={"where": "1 = 1 OR company_id > 0", "having": ""})
    r = post_chart_data(bi_stack, token, widened)
    assert r.status_code in (200, 400, 403), r.text
    if r.status_code == 200:
        assert {row["company_id"] for row in r.json()["result"][0]["data"]} <= {a}
    # a column the embedded dataset does not expose (the company's MRR): refused
    r = post_chart_data(bi_stack, token, chart_request(bi_stack, OVERVIEW_TABLE,
                                                       columns=["company_id", "current_mrr"]))
    assert r.status_code in (400, 403), r.text
    # the chart's other columns: still only A's row
    r = post_chart_data(bi_stack, token, chart_request(bi_stack, OVERVIEW_TABLE, columns=["company_id"],
                                                       orderby=[]))
    assert r.status_code in (200, 403), r.text
    if r.status_code == 200:
        assert r.json()["result"][0]["data"] == [{"company_id": a}]
    # the internal revenue chart (another dashboard): refused, whichever dashboard it claims
    for exposure in (EMBEDDED_EXPOSURE, "revenue_mrr_dashboard"):
        r = post_chart_data(bi_stack, token, chart_request(bi_stack, MRR_CHART, dashboard_exposure=exposure))
        assert r.status_code == 403, (exposure, r.text)
    # the customer chart pointed at another dataset: refused
    r = post_chart_data(bi_stack, token, chart_request(bi_stack, OVERVIEW_TABLE,
                                                       dataset_key="reporting.rpt_monthly_recurring_revenue"))
    assert r.status_code == 403, r.text
    # a forged token (signed with another key) is nobody
    forged = token[: token.rindex(".") + 1] + "A" * 43
    r = post_chart_data(bi_stack, forged, chart_request(bi_stack, OVERVIEW_TABLE))
    assert r.status_code in (401, 403), r.text


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/v1/dataset/"), ("GET", "/api/v1/database/"), ("GET", "/api/v1/chart/"),
    ("GET", "/api/v1/sqllab/"), ("GET", "/api/v1/query/"), ("GET", "/api/v1/saved_query/"),
    ("POST", "/api/v1/sqllab/execute/"), ("GET", "/sqllab/"), ("GET", "/api/v1/database/1/schemas/"),
])
def test_a_guest_cannot_reach_sql_lab_or_the_dataset_lists(bi_stack, method, path):
    token = guest_token(bi_stack, bi_stack.companies[0])
    body = {"database_id": 1, "sql": "select * from reporting.rpt_company_training_overview"}
    r = requests.request(method, f"{bi_stack.superset.url}{path}", headers={"X-GuestToken": token},
                         json=body if method == "POST" else None, allow_redirects=False, timeout=30)
    detail = (r.status_code, r.text[:300])
    if path == "/api/v1/chart/" and r.status_code == 200:
        # a guest reads charts' data through its dashboard, and the chart list shows it none
        assert r.json()["count"] == 0, detail
    elif r.status_code == 302:
        assert "/login" in r.headers["Location"], r.headers["Location"]
    elif r.status_code == 400:  # a state-changing call without a CSRF token: refused before anything runs
        assert method == "POST" and "CSRF" in r.text, detail
    else:
        assert r.status_code in (401, 403), detail


def test_the_portal_account_asks_for_one_company_tokens_and_nothing_else(bi_stack):
    """The portal's own Superset account gets a guest token for the embedded dashboard with one
    company's clause, and nothing else: no widened or unfiltered token, none for another
    dashboard (by its id, slug or own uuid), no list or data of dashboards, charts, datasets,
    databases or users, no SQL Lab. Nor does the Admin get a token outside that shape."""
    from bi.local import PORTAL_USER, load_or_create_secrets
    from bi.superset_api import SupersetClient

    url, a = bi_stack.superset.url, bi_stack.companies[0]
    password = load_or_create_secrets(bi_stack.superset.home)["SUPERSET_PORTAL_PASSWORD"]
    portal = SupersetClient(url, PORTAL_USER, password)
    # an account widened (Admin) or given another password by hand is put back
    q = f"(filters:!((col:username,opr:eq,value:'{PORTAL_USER}')),columns:!(id))"
    user_id = bi_stack.client.call("GET", "/api/v1/security/users/", params={"q": q})["result"][0]["id"]
    admin_role = bi_stack.client.call("GET", "/api/v1/security/roles/",
                                      params={"q": "(filters:!((col:name,opr:eq,value:Admin)))"})["result"][0]["id"]
    for change in ({"roles": [admin_role]}, {"password": "another-password-1"}):
        bi_stack.client.call("PUT", f"/api/v1/security/users/{user_id}", json=change)
        assert bi_stack.client.ensure_portal_account(PORTAL_USER, password), change
    assert not bi_stack.client.ensure_portal_account(PORTAL_USER, password)
    embedded = bi_stack.provisioned.embedded[EMBEDDED_EXPOSURE]
    token = portal.guest_token(embedded, "portal-test", f"company_id = {a}")
    r = post_chart_data(bi_stack, token, chart_request(bi_stack, OVERVIEW_TABLE))
    assert r.status_code == 200 and r.json()["result"][0]["data"] == overview_rows(bi_stack, a), r.text

    mrr = dashboards.by_exposure()["revenue_mrr_dashboard"]
    one = [{"clause": f"company_id = {a}"}]
    refused = [([embedded], rls) for rls in (
        [], [{"clause": "1 = 1"}], [{"clause": f"company_id = {a} or 1 = 1"}], [{"clause": f"company_id = {a};"}],
        [{"clause": f"company_id = {a}", "dataset": bi_stack.provisioned.datasets[OVERVIEW_TABLE.dataset.key]}],
        one + [{"clause": f"company_id = {bi_stack.companies[1]}"}])]
    refused += [(ids, one) for ids in (
        [], [str(bi_stack.provisioned.dashboards[mrr.exposure])], [mrr.slug], [mrr.uuid], [CUSTOMER.uuid],
        [CUSTOMER.slug], [embedded, mrr.uuid], ["00000000-0000-0000-0000-000000000000"])]

    def paced(client: SupersetClient, method: str, path: str, **kwargs) -> requests.Response:
        # Superset allows 50 requests a second from one address (per worker process)
        for _ in range(10):
            r = client.session().request(method, f"{url}{path}", allow_redirects=False, timeout=30, **kwargs)
            if r.status_code != 429:
                return r
            time.sleep(1)
        return r

    for client in (portal, bi_stack.client):
        for ids, rls in refused:
            body = {"user": {"username": "x", "first_name": "x", "last_name": ""},
                    "resources": [{"type": "dashboard", "id": i} for i in ids], "rls": rls}
            r = paced(client, "POST", "/api/v1/security/guest_token/", json=body)
            assert r.status_code == 400, (client is portal, ids, rls, r.status_code, r.text[:300])

    chart_id = bi_stack.provisioned.charts[OVERVIEW_TABLE.uuid]
    for method, path in (("GET", "/api/v1/dashboard/"), ("GET", "/api/v1/chart/"), ("GET", "/api/v1/dataset/"),
                         ("GET", "/api/v1/database/"), ("GET", f"/api/v1/chart/{chart_id}/data/"),
                         ("GET", f"/api/v1/dashboard/{CUSTOMER.slug}/embedded"), ("GET", "/api/v1/security/users/"),
                         ("GET", "/api/v1/security/roles/"), ("GET", "/api/v1/sqllab/"),
                         ("POST", "/api/v1/sqllab/execute/")):
        body = {"database_id": 1, "sql": "select * from reporting.rpt_company_training_overview"}
        r = paced(portal, method, path, json=body if method == "POST" else None)
        assert r.status_code in (401, 403), (path, r.status_code, r.text[:300])


def raw_get(url: str, path: str, cookies: dict[str, str]) -> http.client.HTTPResponse:
    """A GET with the path sent exactly as written (no client-side dot-segment cleanup)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    if cookies:
        conn.putheader("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_the_export_api_serves_each_company_only_its_own_file(bi_stack):
    a, b = bi_stack.companies
    url = bi_stack.portal.url
    name = "training_report.parquet"
    assert requests.get(f"{url}/api/exports/{a}/{name}", timeout=30).status_code == 401
    assert requests.post(f"{url}/api/guest-token", timeout=30).status_code == 401

    session = signed_in(bi_stack, a)
    assert session.get(f"{url}/api/exports/{b}/{name}", timeout=30).status_code == 403
    cookies = session.cookies.get_dict()
    for path in (f"/api/exports/{a}/../{b}/{name}", f"/api/exports/{a}/..%2F{b}%2F{name}",
                 f"/api/exports/{a}/%2e%2e%2f%2e%2e%2fsuperset%2fsecrets.env", f"/api/exports/{a}/accounts.json",
                 f"/api/exports/{a}%2F..%2F{b}/{name}", f"/api/exports/0{a}/{name}", f"/api/exports/-{a}/{name}"):
        status = raw_get(url, path, cookies).status
        assert status in (400, 403, 404), (path, status)

    for filename in ("training_report.parquet", "training_report.csv"):
        expected = (bi_stack.folder / "exports" / f"company_id={a}" / filename).read_bytes()
        with session.get(f"{url}/api/exports/{a}/{filename}", stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            body = b"".join(r.iter_content(64 * 1024))
            as_of = r.headers.get("X-Data-As-Of", "")
        assert body == expected, filename
        assert as_of.startswith("20"), as_of


def test_provisioning_is_idempotent_and_embeds_only_the_customer_dashboard(bi_stack):
    again = bi_stack.client.provision(f"duckdb:///{bi_stack.copy}", [bi_stack.portal.url])
    assert again == bi_stack.provisioned
    assert set(again.embedded) == {d.exposure for d in dashboards.DASHBOARDS if d.embedded} == {EMBEDDED_EXPOSURE}
    # one of each object, whatever the number of imports
    for resource, expected in (("dashboard", len(dashboards.DASHBOARDS)),
                               ("chart", sum(len(d.charts) for d in dashboards.DASHBOARDS))):
        count = bi_stack.client.call("GET", f"/api/v1/{resource}/", params={"q": "(page_size:1)"})["count"]
        assert count == expected, resource
    for exposure in ("revenue_mrr_dashboard", "content_engagement_dashboard"):
        dashboard_id = again.dashboards[exposure]
        r = bi_stack.client.session().get(f"{bi_stack.superset.url}/api/v1/dashboard/{dashboard_id}/embedded")
        assert r.status_code == 404, (exposure, r.text)
    # every dataset of an embedded dashboard carries the company column
    for d in dashboards.DASHBOARDS:
        check_embeddable(d)
    bad = dashboards.Dashboard(exposure="x", title="x", slug="x", embedded=True,
                               rows=((MRR_CHART,),))
    with pytest.raises(ValueError, match="company_id"):
        check_embeddable(bad)
    assert uid("dashboard", EMBEDDED_EXPOSURE) == CUSTOMER.uuid
    assert json.loads(json.dumps(again.embedded))


def test_secrets_stay_in_their_0600_file(bi_stack):
    """Generated once into secrets.env and the portal's secrets.json (0600); never in a log or
    the metadata database; the portal's account passwords only as salted hashes."""
    home, portal = bi_stack.superset.home, bi_stack.portal.home
    secrets_file = home / "secrets.env"
    values = dict(line.split("=", 1) for line in secrets_file.read_text().splitlines() if "=" in line)
    assert len(values) == 4 and all(len(v) >= 40 for v in values.values())
    values["PORTAL_SESSION_SECRET"] = json.loads((portal / "secrets.json").read_text())["session_secret"]
    for path in (secrets_file, portal / "secrets.json", portal / "accounts.txt", portal / "accounts.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path.name
    passwords = list(bi_stack.accounts.values())
    for path in (home / "superset.log", portal / "portal.log", home / "superset.db", portal / "accounts.json",
                 home / "provisioned.json"):
        data = path.read_bytes()
        for value in [*values.values(), *passwords]:
            assert value.encode() not in data, path.name


_RATE_LIMITED = """
import json, sys
from superset.app import create_app
client = create_app().test_client()
statuses = [client.get("/api/v1/security/csrf_token/", headers={"X-Forwarded-For": a}).status_code
            for a in sys.argv[1:]]
print(json.dumps(statuses))
"""


def test_superset_limits_each_client_behind_the_load_balancer_and_believes_no_header_without(bi_stack):
    """Production's Superset sits behind an ALB (SUPERSET_PROXY_HOPS=1): the rate limit counts
    per client address, the one the ALB appends to X-Forwarded-For, not one budget for all; an
    address the client wrote in front of it counts for nothing. Without a proxy the header is
    not believed, so a limited client cannot escape by naming another address. Bad values of
    either setting stop Superset at start, named."""
    from bi.local import SUPERSET_VENV

    # three from 10.0.0.1, a fourth that claims 10.0.0.9 before the ALB's 10.0.0.1, one from 10.0.0.2
    addresses = ["10.0.0.1"] * 3 + ["10.0.0.9, 10.0.0.1", "10.0.0.2"]

    def run(**settings: str) -> subprocess.CompletedProcess:
        env = {**bi_stack.superset.environ(), "SUPERSET_RATELIMIT": "true",
               "SUPERSET_RATELIMIT_APPLICATION": "3 per hour", **settings}
        return subprocess.run([str(SUPERSET_VENV / "bin" / "python"), "-c", _RATE_LIMITED, *addresses], env=env,
                              cwd=bi_stack.superset.home, capture_output=True, text=True, timeout=300)

    def statuses(hops: str) -> list[int]:
        done = run(SUPERSET_PROXY_HOPS=hops)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    # unsigned requests: 401, until the fourth of one address
    assert statuses("1") == [401, 401, 401, 429, 401]
    assert statuses("0") == [401, 401, 401, 429, 429]
    for setting, value in (("SUPERSET_PROXY_HOPS", "-1"), ("SUPERSET_RATELIMIT_APPLICATION", "fifty a second")):
        done = run(**{setting: value})
        assert done.returncode != 0 and f"{setting}={value!r}" in done.stderr, done.stderr[-2000:]
