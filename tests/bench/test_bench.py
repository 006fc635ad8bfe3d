"""`make bench` at the test suite's scale (the session's primary + replica, 20k events), so
the benchmark's code path cannot rot: every measurement but the PostgreSQL one (the same
code path as (a), on the other engine), one repetition each. Asserts what a run writes and
that every flow built what it should; never a timing."""

from __future__ import annotations

import json
from datetime import date, timedelta

from bench.benchmark import run_benchmark
from bench.environment import from_running
from bench.report import DOC_BEGIN, DOC_END, update_doc
from bench.workloads import BenchConfig

from ..conftest import TEST_DAYS

SELECT = "+fct_lesson_events"
MEASUREMENT_FIELDS = {"label", "repetitions", "seconds", "median_s", "min_s", "max_s", "peak_rss_bytes",
                      "rows", "rows_per_s", "node_seconds", "per_repetition"}


def test_benchmark_writes_results_table_chart_and_doc(pg_env, tmp_path, monkeypatch):
    # Fewer daily partitions than the default start: the data spans TEST_DAYS.
    monkeypatch.setenv("FACT_PARTITIONS_START", (date.today() - timedelta(days=TEST_DAYS + 5)).isoformat())
    with pg_env.primary() as conn:
        events_before = conn.execute("select count(*) from app.lesson_events").fetchone()[0]
        checksum_before = conn.execute("select md5(string_agg(e::text, ',' order by event_id))"
                                       " from app.lesson_events e").fetchone()[0]
    # Every stage's code path on a slice of the graph (the daily fact and what it reads), so
    # the test stays cheap: a full build through Dagster is what tests/platform already does.
    config = BenchConfig(work_dir=tmp_path / "work", repetitions=1, stages=("a", "b", "c", "d"),
                         select=SELECT, progress=lambda _m: None)
    doc = tmp_path / "docs" / "benchmarks.md"
    results = run_benchmark(from_running(pg_env.local, pg_env.values), config, tmp_path / "results", doc)

    written = json.loads((tmp_path / "results" / f"{results['id']}.json").read_text())
    assert written["id"] == results["id"]
    assert written["config"]["select"] == SELECT
    assert not written.get("errors"), written["errors"]
    # f, the change detection alone, comes with d
    assert set(written["measurements"]) == {"a", "b", "c", "d", "f"}
    for key, m in written["measurements"].items():
        assert MEASUREMENT_FIELDS <= set(m), key
        assert m["repetitions"] == 1 and len(m["per_repetition"]) == 1
        assert m["peak_rss_bytes"] > 0
    a, b, c, d, f = (written["measurements"][k] for k in "abcdf")
    # f times the comparison after (d) has put the source back, so days differ there by design
    assert f["per_repetition"][0]["days"] > 0 and f["per_repetition"][0]["replica_s"] > 0
    # (a) built every dbt asset, (b) and (c) ran the same models, no test failed anywhere.
    assert a["per_repetition"][0]["assets_materialized"] > 0
    assert a["per_repetition"][0]["dbt_invocations"] >= 2 and not a["per_repetition"][0]["failed"]
    assert not b["per_repetition"][0]["failed"]
    # Plain dbt's parse state was made before the clock, and (a)'s when its platform loaded
    # (with the stage's own settings): neither parsed the project in full inside a measurement.
    assert written["setup"]["parsed"] == ["plain dbt"] and written["setup"]["seconds"] > 0
    assert b["per_repetition"][0]["dbt_full_parses"] == 0
    assert a["per_repetition"][0]["dbt_full_parses"] == 0
    # (a)'s timeline: consecutive phases covering its runs, dbt's own among them
    phases = a["per_repetition"][0]["timeline"]
    assert phases[0]["from"] == 0 and all(p["s"] >= 0 for p in phases)
    assert all(x["to"] <= y["from"] + 0.1 for x, y in zip(phases, phases[1:], strict=False))
    assert sum(p["what"] == "dbt: execution" for p in phases) == a["per_repetition"][0]["dbt_invocations"]
    assert phases[-1]["to"] <= a["per_repetition"][0]["seconds"]
    models = {uid for uid in b["node_seconds"] if uid.startswith(("model.", "snapshot."))}
    assert models and models <= set(c["node_seconds"]) and models <= set(a["node_seconds"])
    assert c["per_repetition"][0]["test_failures"] == {}
    # (d) refreshed what the change batch touched, and the batch left the source again.
    assert d["per_repetition"][0]["change_batch"]["lesson_events_inserted"] == d["new_events_per_batch"] > 0
    assert d["per_repetition"][0]["materialized"]
    batch = d["per_repetition"][0]["change_batch"]
    assert batch["lesson_events_late"] > 0 and batch["lesson_events_edited"] > 0 and batch["lesson_events_deleted"] > 0
    # correct: after the refresh no day of the facts differs from the replica
    assert d["days_differing_after"] == [0]
    with pg_env.primary() as conn:
        assert conn.execute("select count(*) from app.lesson_events").fetchone()[0] == events_before
        # the batch's edits and deletes were put back too
        assert conn.execute("select md5(string_agg(e::text, ',' order by event_id))"
                            " from app.lesson_events e").fetchone()[0] == checksum_before
    assert set(written["ratios"]) == {"a/b", "a/c", "d/a", "f/a"}
    assert {"a/b", "a/c", "d/a", "full refresh wall (s)", "peak RSS (GiB)"} == set(written["targets"])
    assert written["machine"]["cpu_count"] and written["machine"]["memory_bytes"]

    table = written["table_markdown"]
    for name in ("a/b", "a/c", "d/a", "plain `dbt build`", "raw floor", "dbt: execution"):
        assert name in table
    chart = tmp_path / "results" / written["chart"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert text.count(DOC_BEGIN) == text.count(DOC_END) == 1 and table.strip() in text
    assert "make bench" in text
    # A second run replaces the latest section instead of appending one.
    update_doc(doc, table, written, written["chart"])
    assert doc.read_text().count(DOC_BEGIN) == 1
