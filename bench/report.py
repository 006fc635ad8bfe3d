"""What a benchmark run leaves behind: results JSON, a markdown table, a per-model chart and
docs/benchmarks.md."""

from __future__ import annotations

import json
import os
import platform as pyplatform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from . import timeline

# (ratio, numerator, denominator, target): the stock-libraries issue's a/b and a/c, the
# change-detection issue's d/a (d: a 1% batch with late events, edits and deletes).
RATIOS = (
    ("a/b", "a", "b", 1.25),
    ("a/c", "a", "c", 1.5),
    ("d/a", "d", "a", 0.20),
    ("f/a", "f", "a", None),
    ("e/a", "e", "a", None),
)
FULL_REFRESH_TARGET_S = 30.0
PEAK_MEMORY_TARGET_BYTES = 4 * 2**30
PACKAGES = ("dagster", "dagster-dbt", "dbt-core", "dbt-duckdb", "dbt-postgres", "duckdb")
DOC_BEGIN, DOC_END = "<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"


def machine() -> dict[str, Any]:
    model = pyplatform.processor() or pyplatform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "memory_bytes": psutil.virtual_memory().total,
            "system": f"{pyplatform.system()} {pyplatform.release()}", "python": pyplatform.python_version(),
            # Other work on the machine slows every measurement alike; the ratios suffer less.
            "load_average_1m": round(os.getloadavg()[0], 2)}


def versions(pg_bin: Path | None = None) -> dict[str, str]:
    out = {name: metadata.version(name) for name in PACKAGES}
    if pg_bin:
        proc = subprocess.run([str(pg_bin / "postgres"), "--version"], capture_output=True, text=True)
        out["postgresql"] = proc.stdout.strip().rsplit(" ", 1)[-1]
    return out


def ratios(measurements: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, num, den, target in RATIOS:
        if num in measurements and den in measurements and measurements[den]["median_s"] > 0:
            value = round(measurements[num]["median_s"] / measurements[den]["median_s"], 3)
            out[name] = {"value": value, "target": target, "met": None if target is None else value <= target}
    return out


def targets(measurements: dict[str, dict[str, Any]], ratio_values: dict[str, Any]) -> dict[str, Any]:
    out = {name: r for name, r in ratio_values.items() if r["target"] is not None}
    if "a" in measurements:
        a = measurements["a"]["median_s"]
        out["full refresh wall (s)"] = {"value": a, "target": FULL_REFRESH_TARGET_S, "met": a <= FULL_REFRESH_TARGET_S}
    peak = max((m["peak_rss_bytes"] for m in measurements.values()), default=0)
    out["peak RSS (GiB)"] = {"value": round(peak / 2**30, 3), "target": PEAK_MEMORY_TARGET_BYTES / 2**30,
                             "met": peak <= PEAK_MEMORY_TARGET_BYTES}
    return out


def _fmt_s(m: dict[str, Any]) -> str:
    if m["repetitions"] == 1:
        return f"{m['median_s']:.1f}"
    return f"{m['median_s']:.1f} ({m['min_s']:.1f}–{m['max_s']:.1f})"


def table(results: dict[str, Any]) -> str:
    """The markdown table: one row per measurement, then the ratios and targets."""
    ms = results["measurements"]
    lines = [
        f"**{results['scale']['source_events']:,} lesson events** "
        f"({results['machine']['cpu_count']} CPUs, {results['started_at']})",
        "",
        "| | measurement | runs | wall s, median (min–max) | peak RSS MiB | rows/s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted(ms):
        m = ms[key]
        rate = f"{m['rows_per_s']:,}" if m.get("rows_per_s") else "–"
        lines.append(f"| {key} | {m['label']} | {m['repetitions']} | {_fmt_s(m)} | "
                     f"{m['peak_rss_bytes'] / 2**20:,.0f} | {rate} |")
    lines += ["", "| ratio / target | value | target | met |", "| --- | ---: | ---: | :---: |"]
    for name, t in results["targets"].items():
        lines.append(f"| {name} | {t['value']} | ≤ {t['target']:g} | {'yes' if t['met'] else '**no**'} |")
    if "e/a" in results["ratios"]:
        lines.append(f"| e/a (PostgreSQL vs DuckDB) | {results['ratios']['e/a']['value']} | – | – |")
    if "f" in ms:
        reps = ms["f"]["per_repetition"]
        lines.append("")
        lines.append("Change detection (f): replica " + ", ".join(f"{r['replica_s']:.1f}" for r in reps)
                     + " s, warehouse " + ", ".join(f"{r['warehouse_s']:.1f}" for r in reps)
                     + f" s per repetition, {reps[0]['days']} days; days differing after each (d): "
                     + ", ".join(str(x) for x in ms.get("d", {}).get("days_differing_after", [])) + ".")
    if window := ms.get("d", {}).get("recent_window"):
        lines.append(f"(d) compared the last {window['days']} days, which held {window['events']:,} of the source's"
                     f" {window['source_events']:,} events (a reused source ages: the share shrinks day by day).")
    if phases := ms.get("a", {}).get("per_repetition", [{}])[-1].get("timeline"):
        lines += ["", f"Where the last (a) repetition's {ms['a']['per_repetition'][-1]['seconds']:.1f} s went "
                  "(its runs' event logs and dbt's own logs; seconds from the first run's first event):", "",
                  timeline.markdown(phases).rstrip()]
    return "\n".join(lines) + "\n"


def _model_name(uid: str) -> str:
    return uid.split(".")[-1]


def chart(results: dict[str, Any], path: Path) -> Path:
    """Horizontal bars: median seconds per model/snapshot in each full-build measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(k, results["measurements"][k]) for k in ("a", "b", "c", "e") if k in results["measurements"]]
    models = sorted({uid for _, m in series for uid in m["node_seconds"]
                     if uid.split(".")[0] in ("model", "snapshot")},
                    key=lambda u: -max(m["node_seconds"].get(u, 0) for _, m in series))
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.32 * len(models) * max(1, len(series)) / 2 + 1.5)))
    height = 0.8 / max(1, len(series))
    for i, (key, m) in enumerate(series):
        ys = [j + i * height for j in range(len(models))]
        ax.barh(ys, [m["node_seconds"].get(u, 0) for u in models], height=height, label=f"{key}: {m['label']}")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(models))])
    ax.set_yticklabels([_model_name(u) for u in models], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (median over repetitions)")
    ax.set_title(f"Per-model timings, {results['scale']['source_events']:,} events")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    return path


REPRODUCE = """\
## How to reproduce

```bash
make bench                 # 8,000,000 events (first run of a scale loads it: ~1.5 min at 8M)
EVENTS=100000 make bench   # quick mode, a few minutes
BENCH_REPS=5 make bench    # more repetitions; BENCH_STAGES=a,b,c picks measurements
```

Each scale has its own primary + replica under `.local/bench-<EVENTS>` (ports in its
`bench.json`, never the demo's 54320/54321), loaded once and reused; the servers are stopped
at the end. Results: `bench/results/<timestamp>.json` and `.png` (not committed).
"""


def update_doc(doc: Path, table_md: str, results: dict[str, Any], chart_name: str) -> Path:
    """Replace the latest-results section of docs/benchmarks.md (the rest is hand-written)."""
    m = results["machine"]
    v = results["versions"]
    section = "\n".join([
        DOC_BEGIN,
        f"## Latest run: {results['started_at']}",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB memory, "
        f"{m['system']}, Python {m['python']}.  ",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".  ",
        f"Benchmark wall time {results['wall_s']:.0f} s; results `bench/results/{results['id']}.json`, "
        f"chart `bench/results/{chart_name}`.",
        "",
        table_md.rstrip(),
        DOC_END,
    ])
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n" + REPRODUCE
    if DOC_BEGIN in text and DOC_END in text:
        head, rest = text.split(DOC_BEGIN, 1)
        tail = rest.split(DOC_END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return doc
