"""Notebook 04 as a researcher meets it: JupyterLab in a real Chromium (Debian's, driven by Playwright),
Run All, then the feature browser widget rendered in the notebook, answering a click, with nothing
asked of the network but three Panel stylesheets (:data:`PANEL_CDN_CSS`): the notebooks work offline.

Screenshots at 1100 and 1600 px go to $WORKBENCH_SCREENSHOTS when it is set (else the test's tmp dir).
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_feature_browser.ipynb"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
LOCAL = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/|^(data|blob|about):")
PANEL_CDN_CSS = re.compile(r"^https://cdn\.holoviz\.org/panel/[\d.]+/dist/(bundled/theme/(default|native)\.css|css/loading\.css)(\?v=[\d.]+)?$")
"""The stylesheets Panel 1.9.4 still asks its CDN for in a notebook with ``inline=True`` (themes and the
loading spinner of components drawn after the first render; holoviz/panel#8707 fixed part of it). Offline
they fail without visible harm: the widgets carry their own styles. Any other request, JavaScript above
all (without it the widgets stay blank), fails this test."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 over a copy of notebook 04 (its runs/ land in tmp_path),
    with every cell kept in the DOM (no windowing), so the page can be checked cell by cell."""
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         f"--ServerApp.root_dir={tmp_path}", f"--LabApp.user_settings_dir={tmp_path / 'lab-settings'}",
         f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}", "--LabApp.news_url=None"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "WORKBENCH_PROFILE": "quick"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{base}/api/status", timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 2 minutes")
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_notebook_04_runs_in_jupyterlab_and_its_browser_answers_clicks_offline(lab, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    requests: list[str] = []
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        page = chromium.new_page(viewport={"width": 1600, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"{lab}/lab/tree/{NOTEBOOK.name}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
        # The kernel is up (the status bar says so) before Run All, or the cells are not queued.
        page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=120_000)
        for _ in range(3):  # e.g. "select a kernel" on a first start
            dialog = page.locator(".jp-Dialog .jp-mod-accept")
            if not dialog.count():
                break
            dialog.first.click()

        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile("^Run All Cells$")).click()
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]')
        deadline = time.monotonic() + 600
        try:
            page.locator(".jp-InputPrompt", has_text="[*]").first.wait_for(state="attached", timeout=60_000)
        except Exception:
            page.screenshot(path=shots / "notebook04_jupyterlab_not_started.png")
            raise
        # Every queued cell shows [*] until it has run (the kernel's own status is no guide: it reads
        # idle while a cell trains).
        while page.locator(".jp-InputPrompt", has_text="[*]").count():
            if time.monotonic() > deadline or errors.count():
                page.screenshot(path=shots / "notebook04_jupyterlab_failed.png")
                assert errors.count() == 0, errors.first.inner_text()[:2000]
                pytest.fail("Run All did not finish within 10 minutes")
            time.sleep(1)
        assert errors.count() == 0, errors.first.inner_text()[:2000]
        feature_cells = page.locator('.tabulator-cell[tabulator-field="feature"]')
        feature_cells.first.wait_for(state="attached", timeout=30_000)
        prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
        assert prompts and all(re.fullmatch(r"\[\d+\]:", text.strip()) for text in prompts), prompts

        # The browser widget (the first one, cell "4 · The FeatureBrowser widget") answers a click: a
        # feature none of the notebook's browsers shows yet becomes the one its detail shows. (Panel
        # draws in shadow roots, which CSS locators enter and XPath does not.)
        rows = feature_cells
        rows.first.scroll_into_view_if_needed()
        expect(rows.first).to_be_visible(timeout=30_000)
        ids = [int(t) for t in rows.all_inner_texts()[:20] if t.strip().isdigit()]
        target = next(f for f in ids if not page.locator(f'.wb-summary[data-feature="{f}"]').count())
        rows.filter(has_text=re.compile(rf"^{target}$")).first.click()
        expect(page.locator(f'.wb-summary[data-feature="{target}"]').first).to_have_text(
            re.compile(rf"^Feature {target}(?!\d)"), timeout=30_000)

        header = page.locator('.tabulator-col[tabulator-field="feature"]').first
        for width in (1600, 1100):
            page.set_viewport_size({"width": width, "height": 1000})
            for _ in range(5):  # the table redraws at the new width: its elements come and go
                try:
                    header.scroll_into_view_if_needed(timeout=5_000)
                    break
                except PlaywrightError:
                    page.wait_for_timeout(500)
            page.screenshot(path=shots / f"notebook04_jupyterlab_{width}.png")
        chromium.close()

    outside = sorted({url for url in requests if not LOCAL.match(url) and not PANEL_CDN_CSS.match(url)})
    assert not outside, f"{len(outside)} requests left the machine, e.g. {outside[:5]}"
