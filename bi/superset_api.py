"""Superset's REST API, as the platform's service account uses it: provisioning the
dashboards (import format), their embedding, the guest role and the portal's account; and
guest tokens, as the portal's account asks for them.

Only documented endpoints (`/api/v1/...`, Superset's OpenAPI): login for a JWT, a CSRF
token for the state-changing calls, the dashboard import, the embedded-dashboard config,
the roles API (FAB_ADD_SECURITY_API) and `security/guest_token`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import requests

from .dashboards import DASHBOARDS, Dashboard, Provisioned, import_bundle

# What a guest (an embedded viewer) may do: view a dashboard and its charts' data. Copied
# from Superset's own Gamma role, less every view that lists or queries data by itself
# (datasets, databases, SQL Lab, saved queries, explore, uploads...).
GUEST_ROLE = "EmbeddedGuest"
GUEST_PERMISSIONS = {
    ("can_read", "Dashboard"), ("can_read", "Chart"), ("can_read", "EmbeddedDashboard"),
    ("can_read", "DashboardFilterStateRestApi"), ("can_write", "DashboardFilterStateRestApi"),
    ("can_read", "DashboardPermalinkRestApi"), ("can_time_range", "Api"), ("can_read", "Theme"),
    ("can_dashboard", "Superset"), ("can_log", "Superset"),
    ("can_read", "CssTemplate"), ("can_read", "CurrentUserRestApi"), ("can_read", "AvailableDomains"),
    ("can_get_embedded", "Dashboard"), ("can_get", "MenuApi"), ("can_list", "AsyncEventsRestApi"),
}
# The portal's own account: a CSRF token and guest tokens, nothing else (no dashboard, chart,
# dataset or SQL Lab). A compromised portal can still ask for any one company's token, but
# never run a query of its own, edit a dataset or get an unfiltered token: Superset's
# GUEST_TOKEN_VALIDATOR_HOOK (bi/superset/superset_config.py) grants only one-company tokens.
PORTAL_ROLE = "PortalGuestTokens"
PORTAL_PERMISSIONS = {("can_grant_guest_token", "SecurityRestApi"), ("can_read", "SecurityRestApi")}


class SupersetError(RuntimeError):
    pass


class SupersetClient:
    """A logged-in session of one Superset user (the service account, or the portal's)."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 60):
        self.url, self.timeout = url.rstrip("/"), timeout
        self._username, self._password = username, password
        self._lock = threading.Lock()
        self._session: requests.Session | None = None
        self._logged_in_at = 0.0

    def session(self) -> requests.Session:
        """A session with a fresh JWT and CSRF token (renewed every 10 minutes)."""
        with self._lock:
            if self._session is None or time.monotonic() - self._logged_in_at > 600:
                s = requests.Session()
                r = s.post(f"{self.url}/api/v1/security/login", timeout=self.timeout, json={
                    "username": self._username, "password": self._password, "provider": "db", "refresh": False})
                if r.status_code != 200:
                    raise SupersetError(f"login as {self._username} at {self.url}: HTTP {r.status_code}")
                s.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
                r = s.get(f"{self.url}/api/v1/security/csrf_token/", timeout=self.timeout)
                r.raise_for_status()
                s.headers["X-CSRFToken"] = r.json()["result"]
                s.headers["Referer"] = self.url
                self._session, self._logged_in_at = s, time.monotonic()
            return self._session

    def call(self, method: str, path: str, **kwargs) -> Any:
        r = self.session().request(method, f"{self.url}{path}", timeout=self.timeout, **kwargs)
        if r.status_code >= 400:
            raise SupersetError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else None

    def find(self, resource: str, column: str, value: Any, columns: list[str]) -> list[dict]:
        q = f"(filters:!((col:{column},opr:eq,value:'{value}')),columns:!({','.join(columns)}),page_size:100)"
        return self.call("GET", f"/api/v1/{resource}/", params={"q": q})["result"]

    # -- provisioning -----------------------------------------------------------------------
    def provision(self, sqlalchemy_uri: str, portal_origins: list[str],
                  dashboards: tuple[Dashboard, ...] = DASHBOARDS) -> Provisioned:
        """Import every dashboard (overwrite: idempotent), enable embedding of the customer
        dashboards only (and disable it on the others), and the guest role."""
        if not portal_origins and any(d.embedded for d in dashboards):
            # Superset lets any site frame a dashboard whose allowed_domains is empty
            raise SupersetError("no portal origin given (PORTAL_ORIGINS): the customer dashboard would be "
                                "embeddable from any site")
        bundle = import_bundle(sqlalchemy_uri, dashboards)
        self.call("POST", "/api/v1/dashboard/import/",
                  files={"formData": ("dashboards.zip", bundle, "application/zip")},
                  data={"overwrite": "true", "passwords": json.dumps({})})
        out = Provisioned()
        for d in dashboards:
            found = self.find("dashboard", "uuid", d.uuid, ["id", "uuid"])
            if not found:
                raise SupersetError(f"dashboard {d.exposure} ({d.uuid}) not found after import")
            out.dashboards[d.exposure] = found[0]["id"]
            for c in d.charts:
                out.charts[c.uuid] = self.find("chart", "uuid", c.uuid, ["id"])[0]["id"]
            # The datasets keep exactly the columns declared in bi/dashboards.py (no refresh from
            # the table): a column not declared cannot be queried, even by editing a request.
            for ds in d.datasets:
                if ds.key not in out.datasets:
                    out.datasets[ds.key] = self.find("dataset", "uuid", ds.uuid, ["id"])[0]["id"]
            if d.embedded:
                result = self.call("PUT", f"/api/v1/dashboard/{out.dashboards[d.exposure]}/embedded",
                                   json={"allowed_domains": portal_origins})
                out.embedded[d.exposure] = result["result"]["uuid"]
            else:
                # never embeddable, whatever was configured by hand
                r = self.session().delete(f"{self.url}/api/v1/dashboard/{out.dashboards[d.exposure]}/embedded",
                                          timeout=self.timeout)
                if r.status_code not in (200, 404):
                    raise SupersetError(f"disable embedding of {d.exposure}: HTTP {r.status_code}")
        self.ensure_role(GUEST_ROLE, GUEST_PERMISSIONS)
        self.ensure_role(PORTAL_ROLE, PORTAL_PERMISSIONS)
        return out

    def ensure_role(self, name: str, permissions: set[tuple[str, str]]) -> int:
        """The role `name` with exactly `permissions` (created if missing); returns its id."""
        roles = self.call("GET", "/api/v1/security/roles/",
                          params={"q": f"(filters:!((col:name,opr:eq,value:{name})))"})["result"]
        role_id = roles[0]["id"] if roles else self.call("POST", "/api/v1/security/roles/", json={"name": name})["id"]
        pvms, page = [], 0
        while True:
            batch = self.call("GET", "/api/v1/security/permissions-resources/",
                              params={"q": f"(page:{page},page_size:100)"})["result"]
            pvms += batch
            if len(batch) < 100:
                break
            page += 1
        found = {(p["permission"]["name"], p["view_menu"]["name"]): p["id"] for p in pvms}
        if missing := sorted(permissions - found.keys()):
            raise SupersetError(f"role {name}: Superset has no permission {missing}")
        self.call("POST", f"/api/v1/security/roles/{role_id}/permissions",
                  json={"permission_view_menu_ids": sorted(found[p] for p in permissions)})
        return role_id

    def ensure_portal_account(self, username: str, password: str) -> bool:
        """The portal's account: active, PORTAL_ROLE its only role, in no group (a group's roles
        count too), signing in with this password; repaired if not. Returns whether it changed."""
        role_id = self.ensure_role(PORTAL_ROLE, PORTAL_PERMISSIONS)  # its permissions too, each time
        q = f"(filters:!((col:username,opr:eq,value:'{username}')),columns:!(id,active,roles.name,groups))"
        users = self.call("GET", "/api/v1/security/users/", params={"q": q})["result"]
        if users and users[0]["active"] and not users[0].get("groups") \
                and [r["name"] for r in users[0]["roles"]] == [PORTAL_ROLE]:
            try:
                SupersetClient(self.url, username, password, self.timeout).session()
                return False
            except (SupersetError, requests.HTTPError):
                pass  # another password (or a refused sign-in): set this one
        fields = {"roles": [role_id], "groups": [], "password": password,
                  "first_name": "Customer", "last_name": "Portal", "email": f"{username}@localhost",
                  "username": username, "active": True}
        if users:
            self.call("PUT", f"/api/v1/security/users/{users[0]['id']}", json=fields)
        else:
            self.call("POST", "/api/v1/security/users/", json=fields)
        return True

    def invalidate(self, provisioned: Provisioned, note: str) -> None:
        """A new BI copy: bump every dataset's changed_on (part of each cached result's key),
        so no chart serves a result of the previous copy."""
        for dataset_id in sorted(set(provisioned.datasets.values())):
            self.call("PUT", f"/api/v1/dataset/{dataset_id}", json={"description": note})

    def warm(self, provisioned: Provisioned, dashboard: Dashboard) -> int:
        """Run every chart's query once as the service account; returns the rows returned."""
        rows = 0
        for c in dashboard.charts:
            result = self.call("GET", f"/api/v1/chart/{provisioned.charts[c.uuid]}/data/")
            rows += sum(q.get("rowcount", 0) for q in result["result"])
        return rows

    # -- embedding --------------------------------------------------------------------------
    def guest_token(self, embedded_uuid: str, username: str, rls_clause: str) -> str:
        body = {"user": {"username": username, "first_name": username, "last_name": ""},
                "resources": [{"type": "dashboard", "id": embedded_uuid}],
                "rls": [{"clause": rls_clause}]}
        return self.call("POST", "/api/v1/security/guest_token/", json=body)["token"]
