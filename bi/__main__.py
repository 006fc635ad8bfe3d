"""`python -m bi accounts|serve`: the customer portal, locally (`make portal` runs both).

`accounts` makes one account per company with an export (their new passwords go to
`<LOCAL_DIR>/portal/accounts.txt`); `serve` serves the portal on PORTAL_HOST:PORTAL_PORT
(127.0.0.1:8090). The export folder is the platform's EXPORT_URI (platform_assets.settings);
the session key is generated on first use and kept in `<LOCAL_DIR>/portal/secrets.json`
(mode 0600; in prod it must be given). PORTAL_HOME and PORTAL_SESSION_SECRET set in the
environment win.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path

from platform_assets.settings import REPO_ROOT, ConfigurationError, load_settings

from .portal import PortalConfig, PortalError, create_app, exported_companies, read_json, write_accounts, write_private


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
        kept = read_json(path, {})
        if "session_secret" not in kept:
            kept["session_secret"] = secrets.token_urlsafe(48)
            write_private(path, json.dumps(kept))
        env["PORTAL_SESSION_SECRET"] = kept["session_secret"]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bi", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["accounts", "serve"])
    args = parser.parse_args(argv)
    try:
        env = portal_environ()
        config = PortalConfig.from_env(env)
        if args.command == "accounts":
            companies = exported_companies(config.export_root)
            if not companies:
                print(f"no company exports under {config.export_root} yet: `make demo` writes them", file=sys.stderr)
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
