"""The processes of test_portal.py's secrets race, in a module of their own: a spawned process
imports only this, not the test module's heavier imports."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from bi.__main__ import portal_environ


def read_or_make_secrets(env: dict[str, str], ready, out) -> None:
    from bi.local import load_or_create_secrets

    ready.put(os.getpid())
    superset = load_or_create_secrets(Path(env["LOCAL_DIR"]) / "bi")
    out.put((superset, portal_environ(env)["PORTAL_SESSION_SECRET"]))


def another_process_makes_secrets(tmp_path: Path, superset: dict[str, str], locked, go) -> None:
    with contextlib.ExitStack() as stack:
        for folder in (tmp_path / "bi", tmp_path / "portal"):
            fcntl.flock(stack.enter_context(open(folder / ".secrets.lock", "a")), fcntl.LOCK_EX)
        locked.set()
        go.wait(120)
        (tmp_path / "bi" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in superset.items()))
        (tmp_path / "portal" / "secrets.json").write_text(json.dumps({"session_secret": "made-by-another"}))
