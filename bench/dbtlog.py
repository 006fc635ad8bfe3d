"""Where a dbt invocation's time went, from its dbt.log: start-up and parse (until dbt has
found the project's nodes) against execution, and whether the parse was a full one."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

_TEXT_TS = re.compile(r"(\d\d:\d\d:\d\d\.\d{6})")


def _entries(path: Path) -> list[tuple[datetime, str]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                info = json.loads(line)["info"]
                out.append((datetime.fromisoformat(info["ts"].replace("Z", "+00:00")), info.get("msg", "")))
            except (ValueError, KeyError):
                continue
        else:
            m = _TEXT_TS.search(line[:40])
            if m:
                out.append((datetime.strptime(m.group(1), "%H:%M:%S.%f"), line))
    return out


def phases(path: Path) -> dict[str, Any]:
    """Seconds from dbt's first log line to the end of parsing, and from there to the end, of
    the last invocation logged in the file."""
    if not path.exists():
        return {}
    entries = _entries(path)
    starts = [i for i, (_, msg) in enumerate(entries) if "Running with dbt=" in msg]
    if not starts:
        return {}
    entries = entries[starts[-1]:]
    t0, t_end = entries[0][0], entries[-1][0]
    parsed = next((ts for ts, msg in entries if msg.lstrip("\x1b[0m").split("]: ")[-1].startswith("Found ")), None)
    full = any("Unable to do partial parsing" in msg for _, msg in entries)
    out: dict[str, Any] = {"full_parse": full, "logged_s": round((t_end - t0).total_seconds(), 3)}
    if parsed:
        out["parse_s"] = round((parsed - t0).total_seconds(), 3)
        out["execute_s"] = round((t_end - parsed).total_seconds(), 3)
    return out


def window(path: Path) -> dict[str, float] | None:
    """Epoch seconds of the last invocation in the file: its first log line, the end of its
    parse (when found) and its last line. JSON log lines only (dagster-dbt's), which carry the date."""
    if not path.exists():
        return None
    entries = [(ts.timestamp(), msg) for ts, msg in _entries(path) if ts.tzinfo is not None]
    starts = [i for i, (_, msg) in enumerate(entries) if "Running with dbt=" in msg]
    if not starts:
        return None
    entries = entries[starts[-1]:]
    parsed = next((ts for ts, msg in entries if msg.lstrip("\x1b[0m").split("]: ")[-1].startswith("Found ")), None)
    return {"start": entries[0][0], "parsed": parsed if parsed is not None else entries[0][0], "end": entries[-1][0]}
