"""The customer portal: a user of a client company signs in and downloads their company's
exports; the company's embedded dashboards are to join them here.

Sign-in: locally one account per company (`make portal` makes them for every company with an
export: salted scrypt hashes in `<LOCAL_DIR>/portal/accounts.json`, each new password written
once to `accounts.txt`, both mode 0600). In production the product signs its own user in with
a short-lived token: `GET /sso?token=...`, signed with itsdangerous by the key
PORTAL_SSO_SECRET, payload `{"sub": <user>, "company_id": <int>}`, valid 60 s.

Exports: `GET /api/exports/<company_id>/training_report.csv|parquet` answers 401 without a
session, 403 for another company's id, 404 for anything but a plain company id and a known
file name (the path is built from the session's integer and a fixed name, never from the
request's text), and streams the file from EXPORT_URI with its as-of time in `X-Data-As-Of`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import duckdb
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from platform_assets.export_writers import DATA_AS_OF, REPORT_NAME

EXPORT_FILES = {f"{REPORT_NAME}.parquet": "application/vnd.apache.parquet",
                f"{REPORT_NAME}.csv": "text/csv; charset=utf-8"}
_COMPANY_ID = re.compile(r"[1-9][0-9]{0,18}")
_COMPANY_FOLDER = re.compile(r"company_id=([1-9][0-9]{0,18})")
SSO_MAX_AGE_S = 60
SESSION_MAX_AGE_S = 8 * 3600


class PortalError(RuntimeError):
    """A setting or file the portal needs is missing or wrong (named in the message)."""


# -- accounts ---------------------------------------------------------------------------------
def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1)
    return f"scrypt${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, salt, digest = stored.split("$")
        expected = hash_password(password, bytes.fromhex(salt)).split("$")[2]
    except ValueError:
        return False
    return hmac.compare_digest(expected, digest)


def write_private(path: Path, text: str, append: bool = False) -> None:
    """Write a file only its owner can read (mode 0600 from its creation on)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    with os.fdopen(os.open(path, flags, 0o600), "a" if append else "w") as out:
        out.write(text)
    path.chmod(0o600)


def write_accounts(home: Path, company_ids: list[int]) -> dict[str, str]:
    """One account per company (`company-<id>`), kept if it exists. Returns the new accounts'
    passwords, which are also appended to accounts.txt for the developer to sign in with."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "accounts.json"
    accounts = json.loads(path.read_text()) if path.exists() else {}
    created = {}
    for company_id in company_ids:
        user = f"company-{int(company_id)}"
        if user not in accounts:
            password = secrets.token_urlsafe(12)
            accounts[user] = {"company_id": int(company_id), "password": hash_password(password)}
            created[user] = password
    write_private(path, json.dumps(accounts, indent=1))
    if created:
        write_private(home / "accounts.txt", "".join(f"{u} {p}\n" for u, p in created.items()), append=True)
    return created


def exported_companies(export_root: Path) -> list[int]:
    """The companies with an export folder under `export_root`, in numeric order."""
    if not export_root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in export_root.iterdir()
                  if p.is_dir() and (m := _COMPANY_FOLDER.fullmatch(p.name)))


def export_as_of(parquet: Path) -> str:
    """The export's `data_as_of`, from its Parquet key/value metadata ('' when absent)."""
    con = duckdb.connect()
    try:
        row = con.execute("select value from parquet_kv_metadata(?) where key = ?",
                          [str(parquet), DATA_AS_OF]).fetchone()
    finally:
        con.close()
    return row[0].decode() if row else ""


# -- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PortalConfig:
    home: Path  # accounts.json
    export_root: Path
    session_secret: str
    sso_secret: str | None = None
    https_only: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PortalConfig:
        env = dict(os.environ if environ is None else environ)
        missing = [name for name in ("PORTAL_HOME", "EXPORT_URI", "PORTAL_SESSION_SECRET") if not env.get(name)]
        if missing:
            raise PortalError(f"the portal needs {', '.join(missing)} (make portal sets them locally)")
        if env["EXPORT_URI"].startswith("s3://"):
            raise PortalError(f"EXPORT_URI={env['EXPORT_URI']!r}: the portal serves exports from a local folder "
                              "only so far (deploy/README.md, the customer portal)")
        if len(env["PORTAL_SESSION_SECRET"]) < 32:
            raise PortalError("PORTAL_SESSION_SECRET is shorter than 32 characters")
        return cls(home=Path(env["PORTAL_HOME"]), export_root=Path(env["EXPORT_URI"]),
                   session_secret=env["PORTAL_SESSION_SECRET"], sso_secret=env.get("PORTAL_SSO_SECRET") or None,
                   https_only=env.get("PORTAL_HTTPS_ONLY", "false") == "true")


# -- the app ----------------------------------------------------------------------------------
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Training reports</title></head>
<body><header>{user} &middot; <form method="post" action="/logout" style="display:inline">
<button>Sign out</button></form></header><h1>Your company's training report</h1><ul>{links}</ul>
</body></html>"""

LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in</title></head><body>
<form method="post" action="/login"><h1>Sign in</h1>{error}
<label>User <input name="username" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>"""

PRIVATE = {"Cache-Control": "private, no-store"}


def create_app(config: PortalConfig | None = None) -> Starlette:
    config = config or PortalConfig.from_env()
    sso = URLSafeTimedSerializer(config.sso_secret, salt="portal-sso") if config.sso_secret else None

    def accounts() -> dict:
        try:
            return json.loads((config.home / "accounts.json").read_text())
        except FileNotFoundError:
            return {}

    def company_of(request: Request) -> int | None:
        value = request.session.get("company_id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def signed_in(request: Request, user: str, company_id: int) -> Response:
        request.session.clear()
        request.session.update({"user": user, "company_id": company_id})
        return RedirectResponse("/", status_code=303)

    async def login_form(request: Request) -> Response:
        return HTMLResponse(LOGIN.format(error=""))

    async def login(request: Request) -> Response:
        # an urlencoded form, parsed here (Starlette's form parser needs python-multipart)
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
        account = accounts().get(user)
        if account is None or not verify_password(password, account["password"]):
            return HTMLResponse(LOGIN.format(error="<p role=alert>Wrong user or password.</p>"), status_code=401)
        return signed_in(request, user, int(account["company_id"]))

    async def sso_login(request: Request) -> Response:
        if sso is None:
            return PlainTextResponse("single sign-on is not configured", status_code=404)
        try:
            claims = sso.loads(request.query_params.get("token", ""), max_age=SSO_MAX_AGE_S)
            company_id, user = claims["company_id"], str(claims["sub"])
            if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
                raise ValueError(company_id)
        except (BadSignature, KeyError, TypeError, ValueError):
            return PlainTextResponse("invalid sign-on token", status_code=401)
        return signed_in(request, user, company_id)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def home(request: Request) -> Response:
        company_id = company_of(request)
        if company_id is None:
            return RedirectResponse("/login", status_code=303)
        links = "".join(f'<li><a href="/api/exports/{company_id}/{name}">{name}</a></li>' for name in EXPORT_FILES)
        return HTMLResponse(PAGE.format(user=html.escape(request.session.get("user", "")), links=links),
                            headers=PRIVATE)

    async def export(request: Request) -> Response:
        company_id = company_of(request)
        if company_id is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        requested, name = request.path_params["company_id"], request.path_params["name"]
        if not _COMPANY_ID.fullmatch(requested) or name not in EXPORT_FILES:
            return JSONResponse({"error": "no such export"}, status_code=404)
        if int(requested) != company_id:
            return JSONResponse({"error": "not your company's export"}, status_code=403)
        folder = config.export_root / f"company_id={company_id}"
        path = folder / name
        if not path.is_file():
            return JSONResponse({"error": "no export yet"}, status_code=404)
        headers = dict(PRIVATE)
        parquet = folder / f"{REPORT_NAME}.parquet"
        if parquet.is_file():
            headers["X-Data-As-Of"] = export_as_of(parquet)
        # FileResponse sends the file in chunks: a large export never sits in memory.
        return FileResponse(path, media_type=EXPORT_FILES[name], filename=f"company_{company_id}_{name}",
                            headers=headers)

    async def health(request: Request) -> Response:
        return PlainTextResponse("OK")

    return Starlette(
        routes=[
            Route("/", home), Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
            Route("/sso", sso_login), Route("/logout", logout, methods=["POST"]),
            Route("/api/exports/{company_id}/{name}", export), Route("/health", health),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=config.session_secret, session_cookie="portal_session",
                               same_site="lax", https_only=config.https_only, max_age=SESSION_MAX_AGE_S)],
    )
