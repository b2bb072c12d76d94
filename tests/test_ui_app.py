"""The feature browser app as a user meets it: `workbench index` / `workbench browse`, then a real
browser (Debian's chromium, driven by Playwright) on a run trained on MiniLM activations.

The browser test checks what the page shows against what was computed without it: the contexts of
the selected feature against the saved FeatureIndex, and each prompt token's expert against the
Switch SAE's router run directly on the prompt's activations.
"""
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright

from workbench import io
from workbench.cli import main
from workbench.data.embedded import load_model
from workbench.eval.features import FeatureIndex, readable_tokens
from workbench.run import RunConfig, features_dir, index_run, run
from workbench.ui.app import build_app, serve
from workbench.ui.browser import FeatureBrowser
from workbench.ui.router import RouterInspector

CHROMIUM = shutil.which("chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
PROMPT = "The parser reads each line of the file and returns a list of tokens."


def _config(run_dir, cache, source="model"):
    return RunConfig.from_dict({
        "run_dir": str(run_dir),
        "train": {"total_steps": 30, "lr": 1e-3, "log_every": 10, "progress_bar": False},
        "data": {"source": source, "batch_size": 256, "eval_tokens": 2048,
                 "synthetic": {"d": 16, "n_features": 48, "mean_active": 3},
                 "model": {"n_tokens": 4096, "context_length": 64, "downstream_contexts": 8,
                           "cache_dir": str(cache)}},
        "saes": {"switch": {"architecture": "switch", "d_sae": 768 if source == "model" else 64, "k": 8,
                            "n_experts": 4},
                 "topk": {"architecture": "topk", "d_sae": 768 if source == "model" else 64, "k": 8}},
    })


# -------------------------------------------------------------------------------------------------
# The commands, on folders they cannot browse


@pytest.mark.parametrize("command", ["index", "browse"])
def test_missing_run_folder_is_one_line_and_exit_2(tmp_path, capsys, command):
    assert main([command, str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"workbench {command}: error: no run folder at" in err


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    run(_config(root / "run", root / "cache", source="synthetic"), progress=False)
    return root / "run"


@pytest.mark.parametrize("command", ["index", "browse"])
def test_a_synthetic_run_has_no_tokens_to_index(synthetic_run, capsys, command):
    assert main([command, str(synthetic_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "feature index needs a run on model activations; this run used synthetic data" in err
    assert not (synthetic_run / "features").exists()


# -------------------------------------------------------------------------------------------------
# The app in a real browser


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory):
    """A Switch and a TopK SAE trained for 30 steps on MiniLM's resid_post.2, then indexed."""
    root = tmp_path_factory.mktemp("browse")
    run(_config(root / "run", root / "cache"), progress=False)
    index_run(root / "run", progress=False)
    return root / "run"


@pytest.fixture
def page(indexed_run):
    """A chromium page open on the app, served on a free local port, stopped afterwards."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; CI installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(indexed_run, port=port, address="127.0.0.1", threaded=True, progress=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _goto_when_up(page, f"http://127.0.0.1:{port}/")
            yield page
            browser.close()
    finally:
        server.stop()


def _goto_when_up(page, url, timeout_s=30):
    """Open ``url`` once the server thread accepts connections (it starts asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            page.goto(url)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _span_data(page, selector):
    return page.locator(selector).evaluate_all(
        "spans => spans.map(s => ({text: s.textContent, act: s.dataset.act, expert: s.dataset.expert, "
        "rank: s.parentElement.dataset.rank}))")


def test_browser_shows_the_indexed_contexts_and_the_routers_experts(page, indexed_run, tmp_path, monkeypatch):
    start = time.perf_counter()
    index = FeatureIndex.load(features_dir(indexed_run, "switch"))
    page.wait_for_selector('.wb-context[data-feature="0"]', timeout=60_000)  # the first feature, shown at load

    # Select, in the table's first page, the feature with the most top examples (not feature 0).
    n_top = [len(index.top(f)) for f in range(1, 20)]
    f = 1 + n_top.index(max(n_top))
    page.locator('.tabulator-cell[tabulator-field="feature"]').filter(has_text=re.compile(rf"^{f}$")).click()
    page.wait_for_selector(f'.wb-context[data-feature="{f}"]')
    shown = _span_data(page, f'.wb-context[data-feature="{f}"] .wb-tok')
    expected = [(str(rank), tok, act) for rank, ex in enumerate(index.top(f))
                for tok, act in zip(ex.tokens, ex.token_acts)]
    assert len(shown) == len(expected) > 0
    for got, (rank, tok, act) in zip(shown, expected):
        assert (got["rank"], got["text"]) == (rank, tok)
        assert float(got["act"]) == pytest.approx(act, rel=1e-3, abs=1e-6)
    page.screenshot(path=tmp_path / "features.png", full_page=True)

    # The router view: each token of a typed prompt on the expert the router picks for it.
    page.locator(".bk-tab", has_text="Router").click()
    prompt = page.locator('input[placeholder="Type a prompt, then Enter or Route"]')
    prompt.fill(PROMPT)
    prompt.press("Enter")
    page.wait_for_selector(".wb-route")
    routed = _span_data(page, ".wb-route")
    tokens, expert_T = _route_directly(indexed_run / "saes" / "switch", PROMPT)
    assert [s["text"] for s in routed] == tokens
    assert [int(s["expert"]) for s in routed] == expert_T
    page.screenshot(path=tmp_path / "router.png", full_page=True)

    # Choosing an expert in the router view lists only that expert's features in the browser.
    page.locator("select", has=page.locator("option", has_text="all experts")).select_option(index=1 + 2)
    page.locator(".bk-tab", has_text="Features").click()
    experts = page.locator('.tabulator-cell[tabulator-field="expert"]')
    expect(experts.first).to_have_text("2")
    assert set(experts.all_text_contents()) == {"2"} and experts.count() == 20  # a full first page

    # A TopK SAE has no router: its Router tab says so instead of failing.
    page.locator("select").first.select_option("topk")
    page.locator(".bk-tab", has_text="Router").click()
    page.wait_for_selector("text=the router view needs a Switch SAE; this is a topk SAE")

    # An exception in any callback of the session becomes a message at the top of the page.
    def broken_select(self, f):
        raise RuntimeError(f"feature {f} could not be shown")
    monkeypatch.setattr(FeatureBrowser, "select", broken_select)
    page.locator(".bk-tab", has_text="Features").click()
    page.locator('.tabulator-cell[tabulator-field="feature"]').filter(has_text=re.compile(r"^3$")).click()
    expect(page.locator(".wb-error")).to_have_text("feature 3 could not be shown")
    print(f"browser test: {time.perf_counter() - start:.1f} s; screenshots in {tmp_path}")

    for name in ("features.png", "router.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _route_directly(sae_folder: Path, text: str) -> tuple[list[str], list[int]]:
    """The prompt's tokens and each one's expert, from the model's own hidden states (block 2's
    output is hidden_states[3]) through the saved Switch SAE's router, without the app's code."""
    model, tokenizer = load_model(io.read_config(sae_folder)["metadata"]["model"])
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        x_TD = model(**enc, output_hidden_states=True).hidden_states[3][0]
        _, expert_T = io.load(sae_folder).route(x_TD)
    return readable_tokens(tokenizer, enc["input_ids"][0]), expert_T.tolist()


def test_index_then_build_app_which_indexes_the_rest_and_shows_errors_in_the_page(indexed_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(indexed_run, copy, ignore=shutil.ignore_patterns("checkpoints", "features"))
    assert main(["index", str(copy), "--sae", "nope"]) == 2
    assert "no SAE named 'nope'" in capsys.readouterr().err
    assert main(["index", str(copy), "--sae", "topk"]) == 0
    assert f"topk: {features_dir(copy, 'topk')}" in capsys.readouterr().out
    assert FeatureIndex.load(features_dir(copy, "topk")).d_sae == 768
    assert not features_dir(copy, "switch").exists()

    app = build_app(copy, progress=False)  # indexes the SAE that has no index yet, and only that one
    assert "Indexing switch on the run's held-out activations" in capsys.readouterr().out
    assert isinstance(app.views["switch"][1], RouterInspector) and len(app.tabs) == 2

    (copy / "saes" / "topk" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    app.sae = "topk"
    assert app.message.visible and "corrupt or truncated" in app.message.object
    assert len(app.tabs) == 0  # no stale view of the other SAE under the error
    app.sae = "switch"
    assert not app.message.visible and len(app.tabs) == 2
