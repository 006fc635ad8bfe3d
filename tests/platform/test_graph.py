"""The asset graph: validates, matches the reviewed snapshot, every dbt node exactly once,
and the webserver's GraphQL API serves it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from ..conftest import free_port
from .conftest import REPO_ROOT, platform_environ, platform_under_test

SNAPSHOT = Path(__file__).with_name("asset_graph.snapshot.json")
DAGSTER = Path(sys.executable).parent / "dagster"


@pytest.fixture(scope="module")
def local_platform(pg_env, tmp_path_factory):
    with platform_under_test(pg_env, tmp_path_factory.mktemp("graph"), "local") as put:
        yield put


def graph_as_dict(defs: dg.Definitions) -> dict[str, list[str]]:
    graph = defs.resolve_asset_graph()
    return {
        key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
        for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    }


def test_definitions_validate(local_platform):
    proc = subprocess.run(
        [str(DAGSTER), "definitions", "validate", "-m", "platform_assets.definitions"],
        env=local_platform.environ, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_graph_matches_snapshot(local_platform):
    """A change to the graph shows up in review: regenerate with UPDATE_SNAPSHOTS=1."""
    current = graph_as_dict(local_platform.defs)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_every_dbt_node_and_source_appears_exactly_once(local_platform):
    manifest = local_platform.platform.manifest
    graph = local_platform.defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    by_unique_id: dict[str, list[dg.AssetKey]] = {}
    for key in keys:
        spec_meta = graph.get(key).metadata
        uid = spec_meta.get("dagster_dbt/unique_id")
        if uid is not None:
            by_unique_id.setdefault(uid, []).append(key)
    all_nodes = [n for n in manifest["nodes"].values() if n["resource_type"] in ("model", "snapshot")]
    # Ephemeral models are inlined into their consumers: dagster-dbt makes no asset of them
    # and wires their parents straight to the consumers.
    nodes = [n for n in all_nodes if n["config"].get("materialized") != "ephemeral"]
    for node in all_nodes:
        expected = 0 if node["config"].get("materialized") == "ephemeral" else 1
        assert len(by_unique_id.get(node["unique_id"], [])) == expected, node["unique_id"]
    source_keys = {t.key for t in local_platform.platform.federated_tables}
    assert len(source_keys) == len(manifest["sources"]) == len(local_platform.platform.federated_tables)
    assert source_keys <= keys
    assert len(keys) == len(nodes) + len(source_keys)


def test_webserver_graphql_lists_every_asset_with_its_dependencies(pg_env, local_platform, tmp_path):
    port = free_port()
    environ = {**platform_environ(pg_env, tmp_path, "local"), "DAGSTER_HOME": str(local_platform.dagster_home)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-webserver"), "-m", "platform_assets.definitions",
         "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **environ}, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        query = "{ assetNodes { assetKey { path } dependencyKeys { path } } }"
        deadline = time.monotonic() + 180
        body = None
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=10) as response:
                    body = json.loads(response.read())
                if body.get("data", {}).get("assetNodes"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(1)
        assert body and body.get("data"), body
        served = {
            "/".join(n["assetKey"]["path"]): sorted("/".join(d["path"]) for d in n["dependencyKeys"])
            for n in body["data"]["assetNodes"]
        }
        assert served == graph_as_dict(local_platform.defs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
