"""The Dagster UI in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright) opens the global asset lineage of the running webserver and must draw every
asset of the platform as a node: the federated sources, the marts, the dashboards and the
customer export among them."""

from __future__ import annotations

import math
import shutil
from collections import Counter

import dagster as dg
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

from .conftest import platform_under_test

# The global asset lineage ("Lineage" in the navigation) of dagster-webserver 1.13.
LINEAGE_ROUTE = "/asset-groups"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The lineage draws a node with its full name only at a zoom of 0.6 or more (below that it
# draws "minimal" nodes with middle-truncated names), and only the nodes inside the viewport.
# The window is sized so that the whole expanded graph fits at this zoom; it is big, so the
# browser renders it at half the device pixels (the screenshot stays legible).
ZOOM = 0.65
DEVICE_SCALE_FACTOR = 0.5
TIMEOUT_MS = 60_000

# Rendered asset nodes: (name, "source" | "materializable"). The name element carries the
# full name in `data-tooltip`; the node box's class says whether Dagster can materialize it.
RENDERED_NODES_JS = """() => Array.from(
    document.querySelectorAll('[data-svg-viewport] [class*="AssetNode_assetName"] [data-tooltip]')
).map(e => {
    const box = e.closest('[class*="AssetNode_assetNodeBox"]');
    return [e.getAttribute('data-tooltip'),
            box && /AssetNode_source/.test(box.className) ? 'source' : 'materializable'];
})"""
EXPANDED_GROUPS_JS = """() => Array.from(
    document.querySelectorAll('[data-svg-viewport] [class*="ExpandedGroupNode_groupNodeHeaderBox"] [data-tooltip]')
).map(e => e.getAttribute('data-tooltip'))"""
NO_ANIMATIONS_JS = """document.addEventListener('DOMContentLoaded', () => {
    const style = document.createElement('style');
    style.textContent = '*, *::before, *::after { animation: none !important; transition: none !important; }';
    document.head.appendChild(style);
})"""
ALL_DRAWN_JS = """(n) => document.querySelectorAll(
    '[data-svg-viewport] [class*="AssetNode_assetName"] [data-tooltip]').length >= n"""


def chromium_executable() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run .ci/run (as root it installs it), "
                    "or `apt-get install chromium` (Debian's package, /usr/bin/chromium)")
    return path


@pytest.fixture(scope="module")
def ui_platform(pg_env, tmp_path_factory):
    with platform_under_test(pg_env, tmp_path_factory.mktemp("ui"), "local") as put:
        yield put


def test_lineage_graph_draws_sources_marts_dashboards_and_export(platform_webserver, ui_platform, tmp_path):
    executable = chromium_executable()
    graph = ui_platform.defs.resolve_asset_graph()
    keys = sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string())
    by_group: dict[str, list[dg.AssetKey]] = {}
    for key in keys:
        by_group.setdefault(graph.get(key).group_name, []).append(key)
    sources = by_group.get("federated", [])
    marts = [k for k in keys if k.path[0] == "marts"]
    dashboards = by_group.get("dashboards", [])
    exports = by_group.get("exports", [])
    assert sources and marts, sorted(by_group)
    screenshot = tmp_path / "asset-lineage.png"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000},
                                          device_scale_factor=DEVICE_SCALE_FACTOR)
            # The first visit to a local webserver opens a "Join the Dagster community" dialog;
            # it remembers its dismissal in localStorage.
            context.add_init_script("window.localStorage.setItem('communityNux', '\"1\"')")
            # Status spinners on every node would keep a software-rendered, window-sized page
            # repainting; CSS animations change nothing this test looks at.
            context.add_init_script(NO_ANIMATIONS_JS)
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(platform_webserver.url + LINEAGE_ROUTE)
            viewport = page.locator("[data-svg-viewport]")
            # The global lineage opens with every group collapsed into one node.
            viewport.locator('[aria-label="unfold_more"]').first.wait_for()
            # Graph settings (the gear of the graph's toolbar) -> "Expand all groups".
            page.locator('[aria-label="settings"]').last.click()
            page.get_by_text("Expand all groups").filter(visible=True).click()
            page.wait_for_url("**expanded=**")
            page.keyboard.press("Escape")
            viewport.locator('[class*="AssetNode_assetName"]').first.wait_for()

            # Size the window for the whole expanded graph at ZOOM, then load the page again:
            # it opens zoomed to the graph's width, so every node is inside the viewport.
            svg = viewport.locator(":scope > div > svg")
            graph_width, graph_height = float(svg.get_attribute("width")), float(svg.get_attribute("height"))
            box = viewport.bounding_box()
            size = page.viewport_size
            page.set_viewport_size({
                "width": math.ceil(size["width"] - box["width"] + graph_width * ZOOM),
                "height": math.ceil(size["height"] - box["height"] + graph_height * ZOOM + 40),
            })
            page.reload()
            try:
                page.wait_for_function(ALL_DRAWN_JS, arg=len(keys), timeout=TIMEOUT_MS)
            except PlaywrightTimeout:
                pass  # the assertions below say what is missing
            page.screenshot(path=str(screenshot))
            print(f"lineage screenshot: {screenshot}")
            drawn = [tuple(n) for n in page.evaluate(RENDERED_NODES_JS)]
            groups = page.evaluate(EXPANDED_GROUPS_JS)
            minimal = page.locator('[data-svg-viewport] [class*="minimalName"]').count()
        finally:
            browser.close()

    names = Counter(name for name, _ in drawn)
    kinds = {name: kind for name, kind in drawn}
    context_msg = f"drawn: {sorted(names)}; screenshot {screenshot}"
    assert minimal == 0, f"{minimal} nodes drawn minimal (zoom < 0.6); {context_msg}"
    assert sorted(groups) == sorted(by_group), context_msg
    # Every asset of the definitions is a node on the page, exactly once.
    assert names == Counter(k.path[-1] for k in keys), context_msg
    # The federated sources are drawn as observable sources, the marts as materializable.
    for key in sources:
        assert kinds.get(key.path[-1]) == "source", (key.to_user_string(), context_msg)
    for key in marts:
        assert kinds.get(key.path[-1]) == "materializable", (key.to_user_string(), context_msg)
    # The marts' consumers, from the definitions by group.
    assert dashboards, f"the definitions have no asset in group 'dashboards' (groups: {sorted(by_group)})"
    assert exports, f"the definitions have no asset in group 'exports' (groups: {sorted(by_group)})"
    for key in [*dashboards, *exports]:
        assert key.path[-1] in names, (key.to_user_string(), context_msg)
    assert dg.AssetKey(["exports", "company_training_report"]) in exports, exports
