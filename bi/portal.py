"""The customer portal: a user of a client company signs in, sees their company's training
dashboard embedded from Superset, and downloads their company's exports.

Sign-in: locally one account per company (`make portal` makes them for every company with an
export: salted scrypt hashes in `<LOCAL_DIR>/portal/accounts.json`, each new password written
once to `accounts.txt`, both mode 0600). In production the product signs its own user in with
a short-lived token: `GET /sso?token=...`, signed with itsdangerous by the key
PORTAL_SSO_SECRET, payload `{"sub": <user>, "company_id": <int>}`, valid 60 s.

Sessions live in the server process (the cookie holds a random id only): signing out ends a
session for good, a token signs in once, and a session of a removed account ends with it. A
restart signs everyone out; the sessions are not shared between processes (one process
serves the portal).

Embedding (when SUPERSET_URL is set, as `make bi` does): the page loads the embedded SDK
(bi/embed, `npm ci` from its lockfile; served from here) and mounts the dashboard
`customer_training_dashboard` (bi/dashboards.py; the only one marked embeddable, checked at
start). The SDK asks `POST /api/guest-token` for a guest token, which this backend requests
from Superset as its own account (SUPERSET_PORTAL_USER: guest tokens and nothing else, never
the Admin that provisions) with the RLS clause `company_id = <id>`, the integer of the
signed-in session, never anything from the request. The embedded dashboard's uuid is
SUPERSET_EMBEDDED_UUID, else read from SUPERSET_PROVISIONED (the provisioned.json `python -m
bi up` writes): the portal's account cannot look dashboards up.

Exports: `GET /api/exports/<company_id>/training_report.csv|parquet` answers 401 without a
session, 403 for another company's id, 404 for anything but a plain company id and a known
file name (the path is built from the session's integer and a fixed name, never from the
request's text, and must stay inside EXPORT_URI once symlinks are resolved), and streams the
file with its own as-of time in `X-Data-As-Of` (left out when the file does not say). An
s3:// EXPORT_URI (production) is read from S3 (bi/export_store.py)."""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import tempfile
import time
import uuid as uuids
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import requests
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from .dashboards import COMPANY_COLUMN, by_exposure
from .export_store import (
    CHUNK_BYTES,
    EXPORT_FILES,
    S3_ERRORS,
    ExportChanged,
    LocalExports,
    S3Exports,
    export_store,
    open_export,
)
from .superset_api import SupersetClient, SupersetError

REPO_ROOT = Path(__file__).resolve().parents[1]
SDK_BUNDLE = REPO_ROOT / "bi" / "embed" / "node_modules" / "@superset-ui" / "embedded-sdk" / "bundle" / "index.js"
EMBEDDED_EXPOSURE = "customer_training_dashboard"

_COMPANY_ID = re.compile(r"[1-9][0-9]{0,18}")
SSO_MAX_AGE_S = 60
SESSION_MAX_AGE_S = 8 * 3600
MAX_LOGIN_BODY = 4096
LOGIN_THREADS = 2
EXPORT_THREADS = 8
MIN_SECRET_LENGTH = 32
log = logging.getLogger(__name__)


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


def write_private(path: Path, text: str) -> None:
    """Replace `path` whole with a file only its owner can read: written under a temporary name
    created 0600, then renamed over it (a reader sees the old file or the new one)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def read_json(path: Path, default: dict) -> dict:
    """A JSON file of the portal's, or `default` when there is none; an unreadable one is an
    error naming it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise PortalError(f"{path} cannot be read ({exc}): restore it or remove it") from None
    if not isinstance(value, dict):
        raise PortalError(f"{path} does not hold a JSON object: restore it or remove it")
    return value


def write_accounts(home: Path, company_ids: list[int]) -> dict[str, str]:
    """One account per company (`company-<id>`), kept if it exists. Returns the new accounts'
    passwords, which are also added to accounts.txt for the developer to sign in with (before
    the accounts are saved: no account exists whose password nobody was given)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "accounts.json"
    accounts = read_json(path, {})
    created = {}
    for company_id in company_ids:
        user = f"company-{int(company_id)}"
        if user not in accounts:
            password = secrets.token_urlsafe(12)
            accounts[user] = {"company_id": int(company_id), "password": hash_password(password)}
            created[user] = password
    if created:
        listed = home / "accounts.txt"
        before = listed.read_text() if listed.exists() else ""
        write_private(listed, before + "".join(f"{u} {p}\n" for u, p in created.items()))
    write_private(path, json.dumps(accounts, indent=1))
    return created


# -- settings ---------------------------------------------------------------------------------
EMBED_VARIABLES = ("SUPERSET_PORTAL_USER", "SUPERSET_PORTAL_PASSWORD")
EMBEDDED_UUID_VARIABLES = ("SUPERSET_EMBEDDED_UUID", "SUPERSET_PROVISIONED")


@dataclass(frozen=True)
class EmbedConfig:
    superset_url: str  # what this backend calls
    public_url: str  # what the browser loads the embedded dashboard from
    user: str
    password: str = field(repr=False)
    embedded_uuid: str | None  # SUPERSET_EMBEDDED_UUID, when set
    provisioned: Path | None  # else provisioned.json, which holds it once provisioned

    @classmethod
    def from_env(cls, env: dict[str, str]) -> EmbedConfig | None:
        if "SUPERSET_URL" not in env:
            return None
        missing = [name for name in EMBED_VARIABLES if not env.get(name)]
        if not any(env.get(name) for name in EMBEDDED_UUID_VARIABLES):
            missing.append(" or ".join(EMBEDDED_UUID_VARIABLES))
        if missing:
            raise PortalError(f"SUPERSET_URL is set, so the portal also needs {', '.join(missing)} "
                              "(make bi sets them locally)")
        embedded_uuid = env.get("SUPERSET_EMBEDDED_UUID") or None
        if embedded_uuid is not None:
            try:
                embedded_uuid = str(uuids.UUID(embedded_uuid))
            except ValueError:
                raise PortalError(f"SUPERSET_EMBEDDED_UUID is not a uuid: {embedded_uuid!r}") from None
        if not SDK_BUNDLE.is_file():
            raise PortalError(f"{SDK_BUNDLE} is missing: `make venv` installs the embedded SDK (npm ci in bi/embed)")
        return cls(superset_url=env["SUPERSET_URL"], public_url=env.get("SUPERSET_PUBLIC_URL", env["SUPERSET_URL"]),
                   user=env["SUPERSET_PORTAL_USER"], password=env["SUPERSET_PORTAL_PASSWORD"],
                   embedded_uuid=embedded_uuid,
                   provisioned=Path(env["SUPERSET_PROVISIONED"]) if env.get("SUPERSET_PROVISIONED") else None)


@dataclass(frozen=True)
class PortalConfig:
    home: Path  # accounts.json
    exports: LocalExports | S3Exports  # where EXPORT_URI points
    session_secret: str = field(repr=False)
    sso_secret: str | None = field(default=None, repr=False)
    https_only: bool = False
    embed: EmbedConfig | None = None  # None: exports only, no dashboard

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> PortalConfig:
        env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
        missing = [name for name in ("PORTAL_HOME", "EXPORT_URI", "PORTAL_SESSION_SECRET") if name not in env]
        if missing:
            raise PortalError(f"the portal needs {', '.join(missing)} (make portal sets them locally)")
        for name in ("PORTAL_SESSION_SECRET", "PORTAL_SSO_SECRET"):
            if name in env and len(env[name]) < MIN_SECRET_LENGTH:
                raise PortalError(f"{name} is shorter than {MIN_SECRET_LENGTH} characters")
        https_only = env.get("PORTAL_HTTPS_ONLY", "false")
        if https_only not in ("true", "false"):
            raise PortalError(f"PORTAL_HTTPS_ONLY={https_only!r}: use true or false")
        try:
            exports = export_store(env["EXPORT_URI"], env)
        except ValueError as exc:
            raise PortalError(str(exc)) from None
        return cls(home=Path(env["PORTAL_HOME"]), exports=exports,
                   session_secret=env["PORTAL_SESSION_SECRET"], sso_secret=env.get("PORTAL_SSO_SECRET"),
                   https_only=https_only == "true", embed=EmbedConfig.from_env(env))


@dataclass
class Sessions:
    """The signed-in sessions of this process, by the random id their cookie holds, and the
    sign-on tokens already used (kept until they expire)."""

    by_id: dict[str, dict] = field(default_factory=dict)
    used_tokens: dict[str, float] = field(default_factory=dict)

    def open(self, user: str, company_id: int, from_account: bool) -> str:
        now = time.time()
        self.by_id = {k: v for k, v in self.by_id.items() if v["expires"] > now}
        session_id = secrets.token_urlsafe(32)
        self.by_id[session_id] = {"user": user, "company_id": company_id, "account": from_account,
                                  "expires": now + SESSION_MAX_AGE_S}
        return session_id

    def first_use(self, token: str) -> bool:
        """Whether this token (already verified) signs in for the first time. Keyed by what it
        signs (payload and time), not its text: a signature's base64 decodes leniently, so
        variants of one token's text pass the same check."""
        now = time.time()
        self.used_tokens = {k: v for k, v in self.used_tokens.items() if v > now}
        key = hashlib.sha256(token.rsplit(".", 1)[0].encode()).hexdigest()
        if key in self.used_tokens:
            return False
        self.used_tokens[key] = now + SSO_MAX_AGE_S + 5
        return True


# -- the app ----------------------------------------------------------------------------------
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Training reports</title>
<style>#dashboard,#dashboard iframe{{width:100%;height:1100px;border:0}}</style></head>
<body><header>{user} &middot; <form method="post" action="/logout" style="display:inline">
<button>Sign out</button></form></header><h1>Your company's training report</h1><ul>{links}</ul>
{dashboard}</body></html>"""

# The SDK frames Superset's embedded page and fetches each guest token (and its renewals) here.
DASHBOARD = """<div id="dashboard"></div>
<script src="/static/embedded-sdk.js"></script>
<script>
supersetEmbeddedSdk.embedDashboard({{
  id: {embedded_id},
  supersetDomain: {superset},
  mountPoint: document.getElementById("dashboard"),
  fetchGuestToken: () => fetch("/api/guest-token", {{method: "POST"}}).then(r => r.json()).then(j => j.token),
  dashboardUiConfig: {{hideTitle: false, filters: {{visible: false, expanded: false}}}},
}});
</script>"""

LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Sign in</title></head><body>
<form method="post" action="/login"><h1>Sign in</h1>{error}
<label>User <input name="username" autocomplete="username"></label>
<label>Password <input name="password" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>"""

PRIVATE = {"Cache-Control": "private, no-store"}


class S3Download(StreamingResponse):
    """An S3 object's body, read in chunks in the export threads. The S3 response is closed
    when the download ends, however it ends (sent, failed, client gone, never started); a read
    that fails after the headers ends the download short, with one log line."""

    def __init__(self, body, slots: anyio.CapacityLimiter, label: str, **kwargs):
        self.s3_body, self.slots, self.label = body, slots, label
        super().__init__(self._chunks(), **kwargs)

    async def _chunks(self):
        while chunk := await anyio.to_thread.run_sync(self.s3_body.read, CHUNK_BYTES, limiter=self.slots):
            yield chunk

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (*S3_ERRORS, OSError) as exc:
            log.error(f"{self.label} cut short: {exc}")
            return  # not completed: the server closes the connection, the client sees it short
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.s3_body.close()


def create_app(config: PortalConfig | None = None) -> Starlette:
    config = config or PortalConfig.from_env()
    sso = URLSafeTimedSerializer(config.sso_secret, salt="portal-sso") if config.sso_secret else None
    sessions = Sessions()
    embed = config.embed
    superset = SupersetClient(embed.superset_url, embed.user, embed.password) if embed else None
    if embed and by_exposure()[EMBEDDED_EXPOSURE].embedded is not True:
        raise PortalError(f"{EMBEDDED_EXPOSURE} is not marked embeddable in bi/dashboards.py")
    login_slots: anyio.CapacityLimiter | None = None  # made on the event loop, at the first sign-in
    export_slots: anyio.CapacityLimiter | None = None  # S3 reads: a stalled S3 holds these threads only
    # checked for unknown users too, so that a wrong user takes as long as a wrong password
    decoy = hash_password(secrets.token_urlsafe(12))

    def account(user: str) -> dict | None:
        """The account `user`, or None; an unreadable accounts file raises PortalError."""
        found = read_json(config.home / "accounts.json", {}).get(user)
        return found if isinstance(found, dict) and isinstance(found.get("password"), str) else None

    def session_of(request: Request) -> dict | None:
        session_id = request.session.get("id")
        current = sessions.by_id.get(session_id) if isinstance(session_id, str) else None
        if current is None or current["expires"] <= time.time():
            return None
        if current["account"]:  # an account removed or moved ends its sessions
            found = account(current["user"])
            if found is None or found.get("company_id") != current["company_id"]:
                sessions.by_id.pop(session_id, None)
                return None
        return current

    def embedded_uuid() -> str | None:
        """The embedded dashboard's uuid: SUPERSET_EMBEDDED_UUID, else provisioned.json's once
        `python -m bi up` has provisioned (read per request: provisioning replaces the file)."""
        if embed.embedded_uuid is not None:
            return embed.embedded_uuid
        found = read_json(embed.provisioned, {}).get("embedded", {})
        value = found.get(EMBEDDED_EXPOSURE) if isinstance(found, dict) else None
        try:  # it goes into the page's script: a uuid and nothing else
            return str(uuids.UUID(value)) if isinstance(value, str) else None
        except ValueError:
            return None

    def signed_in(request: Request, user: str, company_id: int, from_account: bool) -> Response:
        previous = request.session.get("id")
        if isinstance(previous, str):  # signing in again ends the session this cookie had
            sessions.by_id.pop(previous, None)
        request.session.clear()
        request.session["id"] = sessions.open(user, company_id, from_account)
        return RedirectResponse("/", status_code=303)

    async def login_form(request: Request) -> Response:
        return HTMLResponse(LOGIN.format(error=""))

    async def login(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return PlainTextResponse("sign-in form too large", status_code=413)
        # an urlencoded form, parsed here (Starlette's form parser needs python-multipart)
        try:
            form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:
            return PlainTextResponse("malformed sign-in form", status_code=400)
        user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
        found = account(user)
        stored = found["password"] if found else decoy
        # scrypt takes tens of milliseconds and 16 MiB: off the event loop, a few at a time
        nonlocal login_slots
        login_slots = login_slots or anyio.CapacityLimiter(LOGIN_THREADS)
        if not await anyio.to_thread.run_sync(verify_password, password, stored, limiter=login_slots) or found is None:
            return HTMLResponse(LOGIN.format(error="<p role=alert>Wrong user or password.</p>"), status_code=401)
        return signed_in(request, user, int(found["company_id"]), from_account=True)

    async def sso_login(request: Request) -> Response:
        if sso is None:
            return PlainTextResponse("single sign-on is not configured", status_code=404)
        token = request.query_params.get("token", "")
        try:
            claims = sso.loads(token, max_age=SSO_MAX_AGE_S)
            company_id, user = claims["company_id"], str(claims["sub"])
            if not isinstance(company_id, int) or isinstance(company_id, bool) or company_id <= 0:
                raise ValueError(company_id)
        except (BadSignature, KeyError, TypeError, ValueError):
            return PlainTextResponse("invalid sign-on token", status_code=401)
        if not sessions.first_use(token):
            return PlainTextResponse("this sign-on token was used already", status_code=401)
        return signed_in(request, user, company_id, from_account=False)

    async def logout(request: Request) -> Response:
        session_id = request.session.get("id")
        if isinstance(session_id, str):
            sessions.by_id.pop(session_id, None)
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def home(request: Request) -> Response:
        current = session_of(request)
        if current is None:
            return RedirectResponse("/login", status_code=303)
        company_id = current["company_id"]
        links = "".join(f'<li><a href="/api/exports/{company_id}/{name}">{name}</a></li>' for name in EXPORT_FILES)
        dashboard = ""
        if embed:
            uuid = await anyio.to_thread.run_sync(embedded_uuid)
            # json.dumps quotes for the script; "</" cannot occur in a uuid or a URL we configured
            dashboard = DASHBOARD.format(embedded_id=json.dumps(uuid), superset=json.dumps(embed.public_url)) \
                if uuid else "<p>The dashboard is not provisioned yet.</p>"
        return HTMLResponse(PAGE.format(user=html.escape(current["user"]), links=links, dashboard=dashboard),
                            headers=PRIVATE)

    async def guest_token(request: Request) -> Response:
        current = session_of(request)
        if current is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        uuid = await anyio.to_thread.run_sync(embedded_uuid)
        if uuid is None:
            return JSONResponse({"error": "the dashboard is not provisioned yet"}, status_code=503)
        company_id = int(current["company_id"])
        try:
            # the clause is built from the session's integer company id, nothing else
            token = await anyio.to_thread.run_sync(
                superset.guest_token, uuid, f"portal-company-{company_id}", f"{COMPANY_COLUMN} = {company_id}")
        except (SupersetError, requests.RequestException) as exc:
            log.error(f"guest token for company {company_id}: {exc}")
            return JSONResponse({"error": "the dashboard service did not answer; try again later"}, status_code=502)
        return JSONResponse({"token": token}, headers=PRIVATE)

    async def sdk(request: Request) -> Response:
        return FileResponse(SDK_BUNDLE, media_type="text/javascript")

    async def export(request: Request) -> Response:
        current = session_of(request)
        if current is None:
            return JSONResponse({"error": "sign in first"}, status_code=401)
        company_id = current["company_id"]
        requested, name = request.path_params["company_id"], request.path_params["name"]
        if not _COMPANY_ID.fullmatch(requested) or name not in EXPORT_FILES:
            return JSONResponse({"error": "no such export"}, status_code=404)
        if int(requested) != company_id:
            return JSONResponse({"error": "not your company's export"}, status_code=403)
        nonlocal export_slots
        export_slots = export_slots or anyio.CapacityLimiter(EXPORT_THREADS)
        try:
            # HEAD: the description only, no body opened
            opened = await anyio.to_thread.run_sync(open_export, config.exports, company_id, name,
                                                    request.method != "HEAD", limiter=export_slots)
        except (ExportChanged, *S3_ERRORS) as exc:
            log.error(f"export {name} of company {company_id}: {exc}")
            return JSONResponse({"error": "the exports cannot be read now; try again later"}, status_code=503)
        if opened is None:
            return JSONResponse({"error": "no export yet"}, status_code=404)
        found, body = opened
        headers = dict(PRIVATE)
        if found.as_of:
            headers["X-Data-As-Of"] = found.as_of
        filename = f"company_{company_id}_{name}"
        if found.path is not None:
            # FileResponse sends the file in chunks: a large export never sits in memory.
            return FileResponse(found.path, media_type=EXPORT_FILES[name], filename=filename, headers=headers)
        headers.update({"Content-Length": str(found.size), "Content-Disposition": f'attachment; filename="{filename}"'})
        if body is None:
            return Response(media_type=EXPORT_FILES[name], headers=headers)
        return S3Download(body, export_slots, f"export {name} of company {company_id}", headers=headers,
                          media_type=EXPORT_FILES[name])

    async def health(request: Request) -> Response:
        return PlainTextResponse("OK")

    async def unreadable(request: Request, exc: PortalError) -> Response:
        log.error(str(exc))
        return PlainTextResponse("the portal's files cannot be read; try again later", status_code=503)

    embedding = [Route("/api/guest-token", guest_token, methods=["POST"]),
                 Route("/static/embedded-sdk.js", sdk)] if embed else []

    return Starlette(
        exception_handlers={PortalError: unreadable},
        routes=[
            Route("/", home), Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
            Route("/sso", sso_login), Route("/logout", logout, methods=["POST"]),
            Route("/api/exports/{company_id}/{name}", export), Route("/health", health), *embedding,
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=config.session_secret, session_cookie="portal_session",
                               same_site="lax", https_only=config.https_only, max_age=SESSION_MAX_AGE_S)],
    )
