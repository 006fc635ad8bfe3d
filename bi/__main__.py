"""`python -m bi accounts|secrets|serve|start|up|down|status|publish`: the customer portal and Superset, locally.

`accounts` makes one account per company with an export (their new passwords go to
`<LOCAL_DIR>/portal/accounts.txt`); `serve` serves the portal in the foreground on
PORTAL_HOST:PORTAL_PORT (127.0.0.1:8090), embedding Superset's dashboard when SUPERSET_URL is
set. The export folder is the platform's EXPORT_URI (platform_assets.settings); the session key
is generated on first use and kept in `<LOCAL_DIR>/portal/secrets.json` (mode 0600; in prod it
must be given). PORTAL_HOME and PORTAL_SESSION_SECRET set in the environment win.

`up` (make bi, and the start and end of make demo) publishes the BI copy of the warehouse when
the warehouse changed since the last copy, starts Superset (SUPERSET_PORT, 8088) and the portal
in the background if they are not running (restarting either when its settings or code changed
since it started), writes Superset's address and service account into
`.local/platform.env` (Dagster's dashboards assets provision and warm the dashboards after each
refresh), provisions the dashboards once a copy exists (skipped when their definition is
unchanged), sees that the portal's Superset account exists (guest tokens only), makes the
portal accounts, and prints where to click; `start` does the same
without the last part. `down` stops both, `status` says whether they run, `publish` publishes
the BI copy only. `secrets` (the end of `make up`) generates the installation's secrets if they
do not exist yet: Superset's in `<LOCAL_DIR>/bi/secrets.env`, the portal's session key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from platform_assets.settings import REPO_ROOT, ConfigurationError, held, load_settings

from .export_store import export_store
from .portal import PortalConfig, PortalError, create_app, read_json, write_accounts, write_private

# what `up` writes into .local/platform.env for Dagster's dashboards assets, and `down` removes
SUPERSET_KEYS = ("SUPERSET_URL", "SUPERSET_SERVICE_USER", "SUPERSET_SERVICE_PASSWORD", "SUPERSET_DATABASE_URI",
                 "PORTAL_ORIGINS")
COMMANDS = ("accounts", "secrets", "serve", "start", "up", "down", "status", "publish")


def portal_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment (this process's by default) completed with the local portal's
    settings: EXPORT_URI as the platform reads it (`.local/platform.env` included), PORTAL_HOME
    under LOCAL_DIR, and outside prod a session key generated once and kept in PORTAL_HOME."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if v != ""}
    settings = load_settings(env)
    if "PORTAL_SESSION_SECRET" not in env and settings.env == "prod":
        # each task would sign its own cookies: sessions lost between them
        raise PortalError("PORTAL_SESSION_SECRET is not set; PLATFORM_ENV=prod needs it from the secrets store")
    env["EXPORT_URI"] = settings.export_uri
    env.setdefault("PORTAL_HOME", str(Path(settings.optional("LOCAL_DIR") or REPO_ROOT / ".local") / "portal"))
    if "PORTAL_SESSION_SECRET" not in env:
        home = Path(env["PORTAL_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        path = home / "secrets.json"
        with held(home / ".secrets.lock"):
            kept = read_json(path, {})
            if "session_secret" not in kept:
                kept["session_secret"] = secrets.token_urlsafe(48)
                write_private(path, json.dumps(kept))
            path.chmod(0o600)
        env["PORTAL_SESSION_SECRET"] = kept["session_secret"]
    return env


# -- Superset and the portal in the background (make bi) ----------------------------------------
def _servers(env: dict[str, str]):
    from .local import PortalServer, SupersetServer

    # LOCAL_DIR as the platform reads it (`.local/platform.env` included), like PORTAL_HOME's
    home = Path(load_settings(env).optional("LOCAL_DIR") or REPO_ROOT / ".local").resolve() / "bi"
    home.mkdir(parents=True, exist_ok=True)
    superset_port, portal_port = int(env.get("SUPERSET_PORT", "8088")), int(env.get("PORTAL_PORT", "8090"))
    origins = (f"http://127.0.0.1:{portal_port}", f"http://localhost:{portal_port}")
    superset = SupersetServer(home, superset_port, portal_origins=origins,
                              workers=int(env.get("SUPERSET_WORKERS", "2")))
    portal = PortalServer(Path(env["PORTAL_HOME"]), portal_port, superset, env["EXPORT_URI"])
    return superset, portal


def _warehouse(env: dict[str, str]) -> Path:
    """The DuckDB file dbt writes, as the platform reads its path (`.local/platform.env` included)."""
    settings = load_settings(env)
    local_dir = Path(settings.optional("LOCAL_DIR") or REPO_ROOT / ".local")
    return Path(settings.optional("DUCKDB_PATH") or local_dir / "warehouse.duckdb")


def publish_if_changed(env: dict[str, str]) -> str:
    from platform_assets.bi import copy_path

    from . import dashboards
    from .warehouse_copy import publish_copy

    source = _warehouse(env)
    if not source.exists():
        return f"no warehouse at {source} yet: Dagster's runs build it, then the BI copy (make demo)"
    copy = copy_path(str(source))
    stamp = copy.with_suffix(".source-mtime")
    mtime = str(source.stat().st_mtime_ns)
    if copy.exists() and stamp.exists() and stamp.read_text() == mtime:
        return "BI copy up to date"
    t0 = time.monotonic()
    rows = publish_copy(source, copy, dashboards.relations())
    stamp.write_text(mtime)
    return f"BI copy published: {len(rows)} relations, {sum(rows.values()):,} rows in {time.monotonic() - t0:.1f}s"


def remember_superset(env: dict[str, str], superset, copy: Path) -> None:
    """Superset's address and service account in `.local/platform.env` (0600), where the
    platform reads them: its dashboards assets then provision and warm the dashboards."""
    from dotenv import set_key

    from platform_assets.settings import env_file_path, env_file_values

    from .local import SERVICE_USER, load_or_create_secrets

    path = env_file_path(env)
    if not path.exists():
        return  # no `make up`: nothing local to configure
    wanted = {"SUPERSET_URL": superset.url, "SUPERSET_SERVICE_USER": SERVICE_USER,
              "SUPERSET_SERVICE_PASSWORD": load_or_create_secrets(superset.home)["SUPERSET_SERVICE_PASSWORD"],
              "SUPERSET_DATABASE_URI": f"duckdb:///{copy}", "PORTAL_ORIGINS": ",".join(superset.portal_origins)}
    current = env_file_values(path)
    for key, value in wanted.items():
        if current.get(key) != value:
            set_key(path, key, value)


def up(env: dict[str, str], announce: bool = True) -> int:
    from platform_assets.bi import copy_path

    from . import dashboards
    from .dashboards import Provisioned
    from .local import SERVICE_USER, ensure_portal_account, provision, service_client

    started = time.monotonic()
    superset, portal = _servers(env)
    published = publish_if_changed(env)
    print(f"  {published}")
    copy = copy_path(str(_warehouse(env)))
    t0 = time.monotonic()
    superset.start(timeout=300)
    print(f"  Superset serving at {superset.url} ({time.monotonic() - t0:.1f}s)")
    remember_superset(env, superset, copy)
    origins = list(superset.portal_origins)
    digest = hashlib.sha256(dashboards.import_bundle(f"duckdb:///{copy}") + json.dumps(origins).encode()).hexdigest()
    state = superset.home / "provisioned.json"
    previous = read_json(state, {})
    if not copy.exists():
        print("  no BI copy yet: Dagster's dashboards assets provision the dashboards once the marts are built; "
              "the portal shows its dashboard after the next `make bi`")
    elif previous.get("digest") != digest:
        _, provisioned = provision(superset, copy, origins)
        write_private(state, json.dumps({**read_json(state, {}), "digest": digest}, indent=1))
        print(f"  dashboards provisioned: {', '.join(sorted(provisioned.dashboards))}")
    elif published.startswith("BI copy published"):
        service_client(superset).invalidate(Provisioned(**{k: v for k, v in previous.items() if k != "digest"}),
                                            f"BI copy published {datetime.now(UTC).isoformat(timespec='seconds')}")
        print("  cached chart results of the previous copy dropped")
    if ensure_portal_account(superset):
        print("  the portal's Superset account (guest tokens only) set up")
    companies = export_store(portal.export_uri, env).companies()
    created = write_accounts(portal.home, companies)
    portal.start()
    print(f"  portal serving at {portal.url} ({len(companies)} company accounts, {len(created)} new)")
    provisioned = read_json(state, {})
    if not announce:
        return 0
    print(f"\nwhere to click ({time.monotonic() - started:.1f}s):")
    print(f"  customer portal  {portal.url}/  (sign in as company-<id>; passwords in {portal.home / 'accounts.txt'})")
    for exposure, dashboard_id in sorted(provisioned.get("dashboards", {}).items()):
        print(f"  Superset         {superset.url}/superset/dashboard/{dashboard_id}/  ({exposure})")
    print(f"  Superset sign-in: user {SERVICE_USER}, password SUPERSET_SERVICE_PASSWORD in "
          f"{superset.home / 'secrets.env'}")
    return 0


def down(env: dict[str, str]) -> int:
    from dotenv import unset_key

    from platform_assets.settings import env_file_path, env_file_values

    superset, portal = _servers(env)
    portal.stop()
    superset.stop()
    # Dagster's dashboards assets stop reaching for it: external again until the next `make bi`
    path = env_file_path(env)
    for key in set(SUPERSET_KEYS) & set(env_file_values(path)):
        unset_key(path, key)
    print("  Superset and the portal stopped")
    return 0


def status(env: dict[str, str]) -> int:
    superset, portal = _servers(env)
    for name, server in (("Superset", superset), ("portal", portal)):
        pid = server.owned_pid()
        print(f"  {name:<9} {'running, pid ' + str(pid) + ', ' + server.url if pid else 'stopped'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bi", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=COMMANDS)
    args = parser.parse_args(argv)
    try:
        if args.command == "secrets" and load_settings(dict(os.environ)).env == "prod":
            print("  PLATFORM_ENV=prod: the BI secrets come from the secrets store, none is generated")
            return 0
        env = portal_environ()
        if args.command == "publish":
            print(f"  {publish_if_changed(env)}")
            return 0
        if args.command == "secrets":
            from .local import load_or_create_secrets

            superset, portal = _servers(env)
            load_or_create_secrets(superset.home)
            kept = [superset.home / "secrets.env"] + (
                [portal.home / "secrets.json"] if (portal.home / "secrets.json").exists() else [])
            print(f"  BI secrets kept in {' and '.join(map(str, kept))} (0600)")
            return 0
        if args.command == "start":
            return up(env, announce=False)
        if args.command in ("up", "down", "status"):
            return {"up": up, "down": down, "status": status}[args.command](env)
        config = PortalConfig.from_env(env)
        if args.command == "accounts":
            companies = config.exports.companies()
            if not companies:
                print(f"no company exports under {config.exports} yet: `make demo` writes them", file=sys.stderr)
                return 1
            created = write_accounts(config.home, companies)
            print(f"portal accounts: {len(companies)} companies, {len(created)} new"
                  + (f" (passwords in {config.home / 'accounts.txt'})" if created else ""))
            return 0
        import uvicorn

        host, port = env.get("PORTAL_HOST", "127.0.0.1"), env.get("PORTAL_PORT", "8090")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise PortalError(f"PORTAL_PORT={port!r} is not a port number")
        port = int(port)
        app = create_app(config)
        print(f"customer portal on http://{host}:{port} (sign in with an account of {config.home / 'accounts.txt'})",
              flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return 0
    except (PortalError, ConfigurationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
