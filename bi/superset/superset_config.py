"""Superset's configuration for the platform (SUPERSET_CONFIG_PATH points here).

Every value that differs per installation comes from the environment that `python -m bi`
(bi/local.py) or the production task gives the process: the secrets are generated on the
first `make up` into .local/bi/secrets.env (mode 0600) and never written anywhere else.
"""

import os
import re
import uuid

from limits import parse_many

SECRET_KEY = os.environ["SUPERSET_SECRET_KEY"]
GUEST_TOKEN_JWT_SECRET = os.environ["SUPERSET_GUEST_TOKEN_JWT_SECRET"]
# The metadata database: SQLite under .local/bi locally, PostgreSQL in production.
SQLALCHEMY_DATABASE_URI = os.environ["SUPERSET_METADATA_URI"]

FEATURE_FLAGS = {"EMBEDDED_SUPERSET": True}
# The role an embedded viewer (a guest token) gets: only what viewing a dashboard needs
# (bi/superset_api.py creates it). Its data is further cut by the token's RLS clause.
GUEST_ROLE_NAME = "EmbeddedGuest"
GUEST_TOKEN_JWT_EXP_SECONDS = int(os.environ.get("SUPERSET_GUEST_TOKEN_SECONDS", "300"))
_COMPANY_CLAUSE = re.compile(r"company_id = ([1-9][0-9]{0,18})")  # the portal's company ids


def _company_token_only(body: dict) -> bool:
    """A guest token names embedded dashboards by their embedding uuid only (Superset also takes
    a dashboard's id, slug or own uuid, and ours are in the repository) and carries exactly one
    RLS clause, on one company: whoever may ask for tokens cannot ask for an unfiltered one."""
    from superset.daos.dashboard import EmbeddedDashboardDAO

    rls, resources = body.get("rls") or [], body.get("resources") or []
    clause = _COMPANY_CLAUSE.fullmatch(str(rls[0].get("clause", ""))) if len(rls) == 1 else None
    if clause is None or rls[0].get("dataset") is not None or int(clause[1]) > 2**63 - 1:
        return False
    for resource in resources:
        try:
            embedding = str(uuid.UUID(str(resource.get("id"))))
        except ValueError:
            return False
        if resource.get("type") != "dashboard" or EmbeddedDashboardDAO.find_by_id(embedding) is None:
            return False
    return bool(resources)


GUEST_TOKEN_VALIDATOR_HOOK = _company_token_only
# The roles API (creating EmbeddedGuest) is off by default in Flask-AppBuilder.
FAB_ADD_SECURITY_API = True

# Chart results are cached on disk (shared by the gunicorn workers) for 10 minutes. The key
# includes the guest token's RLS clause (one entry per company) and the dataset's changed_on,
# which `python -m bi up` bumps when it publishes a new BI copy; a copy published by Dagster
# shows within the timeout.
DATA_CACHE_CONFIG = (
    {"CACHE_TYPE": "NullCache"} if os.environ.get("SUPERSET_DATA_CACHE") == "off" else {
        "CACHE_TYPE": "FileSystemCache",
        "CACHE_DIR": os.path.join(os.environ["SUPERSET_HOME"], "cache"),
        "CACHE_DEFAULT_TIMEOUT": int(os.environ.get("SUPERSET_CACHE_SECONDS", "600")),
        "CACHE_THRESHOLD": 100_000,
    })
# Nothing leaves the machine: no telemetry pixel, no example data.
SCARF_ANALYTICS = False
# Many concurrent embedded viewers share one service: keep the login limit for people.
RATELIMIT_ENABLED = os.environ.get("SUPERSET_RATELIMIT", "true") == "true"
# Requests per client address, counted in each gunicorn worker process (a shared store,
# RATELIMIT_STORAGE_URI, would make it one count per service).
RATELIMIT_APPLICATION = os.environ.get("SUPERSET_RATELIMIT_APPLICATION", "50 per second")
try:  # Flask-Limiter parses it at the first request, and would then fail every request
    parse_many(RATELIMIT_APPLICATION)
except ValueError:
    raise ValueError(f"SUPERSET_RATELIMIT_APPLICATION={RATELIMIT_APPLICATION!r} is not a rate limit "
                     "such as '50 per second'") from None
# Behind a load balancer every request comes from its address, so all clients would share
# one budget of the limit above. SUPERSET_PROXY_HOPS=<the proxies in front> (production's ALB:
# 1) takes the client's address from the X-Forwarded-For they append. Never without a proxy:
# a client could then name any address.
_PROXY_HOPS = os.environ.get("SUPERSET_PROXY_HOPS", "0")
if not _PROXY_HOPS.isdigit():
    raise ValueError(f"SUPERSET_PROXY_HOPS={_PROXY_HOPS!r} must be the number of proxies in front (0: none)")
ENABLE_PROXY_FIX = int(_PROXY_HOPS) > 0
# the scheme from the proxy next to Superset, the one that ends TLS
PROXY_FIX_CONFIG = {"x_for": int(_PROXY_HOPS), "x_proto": 1 if ENABLE_PROXY_FIX else 0, "x_host": 0, "x_port": 0,
                    "x_prefix": 0}

# The portal (another origin) frames the embedded dashboard: Superset's default
# X-Frame-Options SAMEORIGIN would refuse it, so the CSP names the portal instead.
_PORTAL_ORIGINS = [o for o in re.split(r"[,\s]+", os.environ.get("PORTAL_ORIGINS", "")) if o]
TALISMAN_ENABLED = True
TALISMAN_CONFIG = {
    "content_security_policy": {
        "base-uri": ["'self'"],
        "default-src": ["'self'"],
        "img-src": ["'self'", "blob:", "data:"],
        "worker-src": ["'self'", "blob:"],
        "connect-src": ["'self'"],
        "object-src": "'none'",
        "style-src": ["'self'", "'unsafe-inline'"],
        "font-src": ["'self'", "data:"],
        "script-src": ["'self'", "'strict-dynamic'"],
        "frame-ancestors": ["'self'", *_PORTAL_ORIGINS],
    },
    "content_security_policy_nonce_in": ["script-src"],
    "frame_options": None,
    "force_https": False,
    "session_cookie_secure": False,
}
