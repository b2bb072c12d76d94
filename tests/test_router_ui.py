"""The router inspector without a browser: a prompt comes back as one coloured span per token whose
expert and probability are the runner's, choosing an expert (selector, bar click, or the browser
itself) moves the feature browser's group filter, clicking a duplicate pair selects its latent in
the browser, the analysis panes show the analysis' numbers, the expert colours stay apart (also for
colour-blind eyes), the similarity heatmap keeps one labelled scale, tokens show as the browser shows
them (no "##"), and bad input is a message, never a traceback. One test drives the served view in
Debian's chromium (skipped without it)."""
from __future__ import annotations

import itertools
import re
import shutil
import socket
import time
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import NamedTuple

import panel as pn
import param
import pytest
import torch
from bokeh.models import ColorBar, HoverTool, LinearColorMapper, Span
from panel.models.tabulator import CellClickEvent

from workbench.data.embedded import DEFAULT_MODEL, load_model
from workbench.eval.prompt import PromptRunner
from workbench.eval.router import ENTROPY_BINS, RouterAnalysis
from workbench.saes import SwitchConfig, SwitchSAE
from workbench.ui import style
from workbench.ui.router import SHOWN_DUPLICATES, RouterInspector, display_token
from workbench.ui.style import EXPERT_PALETTE, expert_colors, text_color

E, W = 4, 16


class FakeResult(NamedTuple):
    tokens: list[str]
    token_ids: torch.Tensor
    acts_TF: torch.Tensor
    expert_T: torch.Tensor | None
    probs_TE: torch.Tensor | None


class FakeRunner:
    """Splits the prompt into words (each after the first with its leading space) and routes each
    with seeded random probabilities, like PromptRunner's result; ``router=False`` acts as a runner
    over an SAE without a router."""

    def __init__(self, router: bool = True):
        self.router = router

    def run(self, text: str) -> FakeResult:
        if not text.strip():
            raise ValueError("type a prompt to see which features fire")
        words = text.split(" ")
        tokens = words[:1] + [" " + w for w in words[1:]]  # as readable_tokens gives them: each word's space
        probs_TE = torch.softmax(3 * torch.randn(len(tokens), E, generator=torch.Generator().manual_seed(len(text))), -1)
        expert_T = probs_TE.argmax(-1) if self.router else None
        return FakeResult(tokens, torch.arange(len(tokens)), torch.zeros(len(tokens), E * W), expert_T,
                          probs_TE if self.router else None)


class StubBrowser(param.Parameterized):
    """The feature browser as the router sees it: a group filter and select(f), both recorded in
    ``calls`` in the order they happen."""

    group_filter = param.Integer(default=None, allow_None=True)

    def __init__(self, **params):
        super().__init__(**params)
        self.calls: list[tuple[str, int | None]] = []
        self.param.watch(lambda event: self.calls.append(("group_filter", event.new)), "group_filter")

    def select(self, f: int) -> None:
        self.calls.append(("select", f))


class Spans(HTMLParser):
    """The wb-route spans of a pane: their attributes and (unescaped) text."""

    def __init__(self, markup: str):
        super().__init__()
        self.spans: list[dict[str, str]] = []
        self._open = False
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "wb-route":
            self.spans.append({**attrs, "text": ""})
            self._open = True

    def handle_endtag(self, tag):
        self._open = False

    def handle_data(self, data):
        if self._open:
            self.spans[-1]["text"] += data


@pytest.fixture
def analysis() -> RouterAnalysis:
    edges = torch.linspace(0, torch.log(torch.tensor(float(E))).item(), ENTROPY_BINS + 1, dtype=torch.float64)
    duplicates = [(a, a + W + 1, 0.99 - a / 1000) for a in range(SHOWN_DUPLICATES + 5)]
    return RouterAnalysis(
        n_tokens=1000, expert_width=W, expert_load=torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64),
        mean_prob=torch.tensor([0.35, 0.3, 0.2, 0.15], dtype=torch.float64),
        entropy_counts=torch.arange(ENTROPY_BINS), entropy_edges=edges,
        top_tokens=[[("the", 50), ("##ing", 20)], [(" cat", 9)], [("\n", 4)], []],
        dead_per_expert=torch.tensor([0, 1, 2, 3]), similarity=torch.rand(E, E, generator=torch.Generator().manual_seed(0)),
        duplicates=duplicates, n_duplicate_pairs=70, n_duplicated_latents=80, dup_threshold=0.9)


def messages(pane) -> list[str]:
    return re.findall(r'<div class="wb-message"[^>]*>(.*?)</div>', pane.object)


def test_a_prompt_is_shown_token_by_token_on_its_experts_colours(analysis):
    runner = FakeRunner()
    inspector = RouterInspector(analysis, runner)
    text = "Switch routers send <b>&amp; each token to one expert"
    inspector.prompt_input.value_input = text  # what typing does; the button routes what was typed
    inspector.route_button.clicks += 1
    expected = runner.run(text)
    spans = Spans(inspector.tokens_pane.object).spans
    assert [s["text"] for s in spans] == expected.tokens  # "<b>&amp;" shown as typed, not as markup
    assert [int(s["data-expert"]) for s in spans] == expected.expert_T.tolist()
    colors = expert_colors(E)
    for t, s in enumerate(spans):
        e = expected.expert_T[t].item()
        p = f"{expected.probs_TE[t, e].item():.2f}"
        assert s["data-prob"] == p and s["title"] == f"expert {e}, p={p}"
        assert f"background:{colors[e]}" in s["style"]
    assert len(set(expected.expert_T.tolist())) > 1  # the colours do differ along the prompt

    inspector.prompt_input.value_input = "another prompt here"  # Enter routes too
    inspector.prompt_input.param.trigger("enter_pressed")
    assert [s["text"] for s in Spans(inspector.tokens_pane.object).spans] == ["another", " prompt", " here"]


def test_the_real_prompt_runner_on_minilm(analysis):
    model, tokenizer = load_model(DEFAULT_MODEL)
    sae = SwitchSAE(SwitchConfig(d_in=384, d_sae=E * W, n_experts=E, k=4))
    with torch.no_grad():
        sae.W_router.mul_(10)  # an untrained router this sharp sends tokens to several experts
    runner = PromptRunner(model, tokenizer, "resid_post.2", sae)
    inspector = RouterInspector(analysis, runner)
    text = "Sparse autoencoders tokenization"
    inspector.prompt_input.value_input = text
    inspector.route_button.clicks += 1
    expected = runner.run(text)
    spans = Spans(inspector.tokens_pane.object).spans
    assert [s["text"] for s in spans] == expected.tokens and expected.tokens[0].strip() == "[CLS]"
    assert [int(s["data-expert"]) for s in spans] == expected.expert_T.tolist()
    assert [s["data-prob"] for s in spans] == [f"{p:.2f}" for p in expected.probs_TE.max(-1).values.tolist()]
    assert len(set(expected.expert_T.tolist())) > 1
    inspector.route("")
    assert messages(inspector.tokens_pane) == ["Type a prompt to see which expert each token goes to."]


def test_bad_prompts_are_messages_not_tracebacks(analysis):
    inspector = RouterInspector(analysis, FakeRunner())
    for text in ("", "   "):
        inspector.prompt_input.value_input = text
        inspector.route_button.clicks += 1
        assert messages(inspector.tokens_pane) == ["Type a prompt to see which expert each token goes to."]
        assert not Spans(inspector.tokens_pane.object).spans

    class Broken:
        def run(self, text):
            raise ValueError("the prompt has 600 tokens but the model takes 512")

    inspector = RouterInspector(analysis, Broken())
    inspector.route("a long prompt")
    assert messages(inspector.tokens_pane) == ["Could not route this prompt: the prompt has 600 tokens but the "
                                               "model takes 512"]
    inspector = RouterInspector(analysis, FakeRunner(router=False))
    inspector.route("a prompt")
    assert messages(inspector.tokens_pane) == ["This SAE has no router; the router view needs a Switch SAE."]

    no_model = RouterInspector(analysis)
    assert no_model.prompt_input.disabled and no_model.route_button.disabled
    assert "Load the model to route your own text" in messages(no_model.tokens_pane)[0]


def test_missing_analysis_says_how_to_build_it_and_prompts_still_route():
    inspector = RouterInspector(None, FakeRunner())
    first = inspector.__panel__()[0].object
    assert "No router analysis for this SAE yet" in first and "workbench index RUN_DIR" in first
    inspector.route("still works")
    assert len(Spans(inspector.tokens_pane.object).spans) == 2
    pn.panel(inspector).get_root()  # renders


def test_choosing_an_expert_sets_the_browser_filter_both_ways(analysis):
    browser = StubBrowser()
    inspector = RouterInspector(analysis, FakeRunner(), browser=browser)
    inspector.route("which expert takes which token")
    labels = inspector.expert_select.options
    assert labels[0] == "all experts" and labels[3] == "expert 2: 20.0% of tokens"
    inspector.expert_select.value = labels[3]
    assert browser.group_filter == 2 and inspector.expert == 2
    assert inspector.load_source.selected.indices == [2]  # its bar is highlighted
    assert re.findall(r'<tr class="wb-expert-row wb-selected"[^>]*data-expert="(\d+)"',
                      inspector.experts_pane.object) == ["2"]
    for s in Spans(inspector.tokens_pane.object).spans:  # the other experts' tokens fade
        assert ("opacity:1;" in s["style"]) == (s["data-expert"] == "2")

    inspector.load_source.selected.indices = [1]  # a click on bar 1
    assert browser.group_filter == 1 and inspector.expert_select.value == labels[2]
    inspector.expert_select.value = labels[1]
    assert browser.group_filter == 0  # expert 0 is not "no expert"
    inspector.expert_select.value = labels[0]
    assert browser.group_filter is None and inspector.load_source.selected.indices == []

    browser.group_filter = 3  # set from the browser's side
    assert inspector.expert == 3 and inspector.expert_select.value == labels[4]

    plain = SimpleNamespace(group_filter=None)  # any object with the attribute will do
    other = RouterInspector(analysis, browser=plain)
    other.expert_select.value = other.expert_select.options[2]
    assert plain.group_filter == 1


def test_analysis_panes_show_the_analysis(analysis):
    inspector = RouterInspector(analysis)
    load = inspector.load_source.data
    assert load["load"] == analysis.expert_load.tolist() and load["prob"] == analysis.mean_prob.tolist()
    assert load["color"] == expert_colors(E)
    uniform = [r for r in inspector.load_plot.object.center if isinstance(r, Span)]
    assert [s.location for s in uniform] == [1 / E]

    quad = inspector.entropy_plot.object.renderers[0].data_source.data
    assert quad["top"] == analysis.entropy_counts.tolist() and quad["right"][-1] == pytest.approx(1.3863, abs=1e-4)

    heat = inspector.heatmap_source.data
    assert [heat["sim"][k] for k in range(E * E) if heat["i"][k] == 1 and heat["j"][k] == 3] == \
        [analysis.similarity[1, 3].item()]
    assert len(heat["sim"]) == E * E

    frame = inspector.duplicates_table.value
    assert list(zip(frame["latent"], frame["twin"], frame["cosine"])) == analysis.duplicates[:SHOWN_DUPLICATES]
    assert frame["expert"].tolist() == [a // W for a, _, _ in analysis.duplicates[:SHOWN_DUPLICATES]]
    summary = inspector.__panel__()[-1][1][0].object
    assert "<b>70</b> pairs" in summary and "<b>80</b> of 64 latents" in summary

    table = inspector.experts_pane.object
    assert "##" not in table and "ing&nbsp;" in table and "cat&nbsp;" in table and "↵" in table and "1/16" in table
    assert "load balance E·Σ f·P = 1.140" in inspector.__panel__()[0].object
    pn.panel(inspector).get_root()  # every Bokeh model builds


def test_expert_colors_are_distinct_for_64_experts():
    colors = expert_colors(64)
    assert len(set(colors)) == 64 and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
    assert expert_colors(8) == colors[:8]  # an expert keeps its colour whatever E is


# -------------------------------------------------------------------------------------------------
# Colours: CIELAB distances in normal and simulated colour-blind vision

_DEUTERANOPIA = torch.tensor([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]], dtype=torch.float64)  # Machado et al. 2009
_PROTANOPIA = torch.tensor([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]], dtype=torch.float64)


def _linear_rgb(color: str) -> torch.Tensor:
    c = torch.tensor([int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)], dtype=torch.float64)
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(color: str, vision: torch.Tensor | None = None) -> torch.Tensor:
    rgb = _linear_rgb(color)
    if vision is not None:
        rgb = (vision @ rgb).clamp(0, 1)
    xyz = torch.tensor([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
                       dtype=torch.float64) @ rgb / torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
    f = torch.where(xyz > 216 / 24389, xyz.pow(1 / 3), (24389 / 27 * xyz + 16) / 116)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _closest(colors: list[str], vision: torch.Tensor | None = None) -> float:
    """The smallest CIE76 distance between two of ``colors`` (about 2.3 is just noticeable)."""
    return min(float((_lab(a, vision) - _lab(b, vision)).norm()) for a, b in itertools.combinations(colors, 2))


def test_the_palette_keeps_16_experts_apart_and_8_apart_for_colour_blind_eyes():
    assert len(set(EXPERT_PALETTE)) >= 16 and expert_colors(16) == list(EXPERT_PALETTE[:16])
    assert len(set(expert_colors(8))) == 8
    assert _closest(expert_colors(16)) > 20  # tab20's first 16: 17; the old golden-angle colours: 11
    for vision in (_DEUTERANOPIA, _PROTANOPIA):
        assert _closest(expert_colors(8), vision) > 15  # tab20's first 8: 7 and 5
    # No two greys: each colour has a hue of its own (CIELAB chroma at least 25).
    assert min(float(_lab(c)[1:].norm()) for c in EXPERT_PALETTE) > 25
    for color in EXPERT_PALETTE:  # the token text on it reads at WCAG AA contrast
        lum = float(torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64) @ _linear_rgb(color))
        on = {"#000000": (lum + 0.05) / 0.05, "#ffffff": 1.05 / (lum + 0.05)}
        assert on[text_color(color)] >= 4.5 and on[text_color(color)] == max(on.values()), color


def test_every_expert_coloured_element_uses_the_same_colours(analysis):
    inspector = RouterInspector(analysis, FakeRunner())
    inspector.route("a prompt of eight words for four experts")
    colors = expert_colors(E)
    assert inspector.load_source.data["color"] == colors
    legend = dict(re.findall(r'class="wb-legend-item" data-expert="(\d+)".*?background:(#[0-9a-f]{6})',
                             inspector.legend_pane.object))
    assert legend == {str(e): colors[e] for e in range(E)}
    table = dict(re.findall(r'data-expert="(\d+)"><td><span style="background:(#[0-9a-f]{6})',
                            inspector.experts_pane.object))
    assert table == legend
    for s in Spans(inspector.tokens_pane.object).spans:
        assert f"background:{colors[int(s['data-expert'])]}" in s["style"]
    expected = inspector.result.expert_T.tolist()  # the legend counts the prompt's tokens per expert
    counts = re.findall(r'data-expert="(\d+)".*?(\d+) tok</small>', inspector.legend_pane.object)
    assert {int(e): int(n) for e, n in counts} == {e: expected.count(e) for e in range(E)}

    legend_only = RouterInspector(None, FakeRunner())  # no analysis: the legend comes with the first prompt
    assert legend_only.legend_pane.object == ""
    legend_only.route("now there are experts")
    assert legend_only.legend_pane.object.count("wb-legend-item") == E


# -------------------------------------------------------------------------------------------------
# The similarity heatmap


def test_heatmap_has_a_fixed_labelled_cosine_scale(analysis):
    narrow = RouterAnalysis(**{**vars(analysis), "similarity": 0.19 + 0.08 * analysis.similarity})
    for a in (analysis, narrow):  # whatever the values, the same scale
        inspector = RouterInspector(a)
        fig = inspector.heatmap_plot.object
        mapper = inspector.heatmap_mapper
        assert isinstance(mapper, LinearColorMapper) and (mapper.low, mapper.high) == (0.0, 1.0)
        bars = [r for r in fig.right if isinstance(r, ColorBar)]
        assert len(bars) == 1 and bars[0].color_mapper is mapper and "cosine" in bars[0].title
        assert bars[0].ticker.ticks[0] == 0 and bars[0].ticker.ticks[-1] == 1
        assert fig.xaxis[0].axis_label.startswith("expert") and fig.yaxis[0].axis_label.startswith("expert")
        tooltips = [t for tool in fig.tools if isinstance(tool, HoverTool) for t in tool.tooltips]
        assert ("mean best cosine", "@sim{0.000}") in tooltips
        labels = inspector.heatmap_source.data["label"]  # and written in the cells, as on hover
        assert labels == [f"{a.similarity[i, j].item():.3f}" for i in range(E) for j in range(E)]


# -------------------------------------------------------------------------------------------------
# Duplicates select their latents in the browser


def _click(inspector, column: str, row: int) -> None:
    """What a click on a cell of the duplicates table sends to Python."""
    inspector.duplicates_table._process_event(CellClickEvent(model=None, column=column, row=row))


def test_clicking_a_duplicate_pair_selects_its_latent_in_the_browser(analysis):
    browser = StubBrowser()
    inspector = RouterInspector(analysis, browser=browser)
    a, b, _ = analysis.duplicates[3]  # latent 3 of expert 0, its twin 20 of expert 1
    _click(inspector, "latent", 3)
    assert browser.calls == [("select", a)] and browser.group_filter is None  # all experts listed: no filter
    _click(inspector, "twin", 3)
    _click(inspector, "cosine", 3)  # any other cell of the row: the latent
    assert browser.calls[1:] == [("select", b), ("select", a)]
    assert f"Latent {a} selected in the feature browser" in inspector.duplicate_note.object

    # With the browser filtered to another expert, the latent's expert is chosen first, then the
    # latent: the browser's list then holds the latent it shows.
    inspector.expert = 3
    browser.calls.clear()
    _click(inspector, "twin_expert", 3)
    assert browser.calls == [("group_filter", b // W), ("select", b)] and inspector.expert == b // W

    no_browser = RouterInspector(analysis)  # nothing to select in: says so, does not fail
    _click(no_browser, "latent", 0)
    assert "no feature browser" in no_browser.duplicate_note.object


def test_ids_are_plain_integers(analysis):
    wide = RouterAnalysis(**{**vars(analysis), "expert_width": 4096,
                             "duplicates": [(1234, 12345, 0.95)], "n_duplicate_pairs": 1})
    inspector = RouterInspector(wide, browser=StubBrowser())
    formatters = inspector.duplicates_table.formatters
    assert all(formatters[c].format == "0" for c in ("latent", "expert", "twin", "twin_expert"))
    _click(inspector, "twin", 0)
    assert "Latent 12345 selected" in inspector.duplicate_note.object
    load = inspector.load_plot.object
    tooltips = dict(t for tool in load.tools if isinstance(tool, HoverTool) for t in tool.tooltips)
    assert tooltips["expert"] == "@expert{0}" and tooltips["f"] == "@load{0.0%}"  # f in % as in the table
    assert load.xaxis[0].ticker.ticks == list(range(E))  # whole experts on the axis, no "0.5"


# -------------------------------------------------------------------------------------------------
# One token display


def test_display_token_shows_tokens_as_the_browser_does():
    assert display_token(" the") == "the" and display_token("ing") == "ing"
    assert display_token("##ing") == "ing"  # an analysis saved with tokenizer.decode's markers
    assert [display_token(t) for t in ("\n", "\t", " ", "", "##", "###")] == ["↵", "⇥", "␣", "∅", "##", "###"]
    for token in (" the", "ing", "\n", " ", "", " \n", "cat ", "##"):  # as the browser shows them
        assert display_token(token) == style.token_label(token), repr(token)


def test_no_wordpiece_markers_anywhere_and_continuations_joined(analysis):
    model, tokenizer = load_model(DEFAULT_MODEL)
    sae = SwitchSAE(SwitchConfig(d_in=384, d_sae=E * W, n_experts=E, k=4))
    inspector = RouterInspector(analysis, PromptRunner(model, tokenizer, "resid_post.2", sae))
    inspector.route("Sparse autoencoders tokenization")
    shown = [inspector.tokens_pane.object, inspector.legend_pane.object, inspector.experts_pane.object]
    assert all("##" not in markup for markup in shown)  # the fixture's top tokens have "##ing"
    spans = Spans(inspector.tokens_pane.object).spans
    joined = [s["text"] for s in spans if s.get("data-cont") == "1"]
    assert "ization" in joined and all(not s["text"].startswith(" ") for s in spans if s.get("data-cont"))
    assert all("box-shadow" in s["style"] for s in spans if s.get("data-cont"))
    assert "".join(s["text"] for s in spans).strip().startswith("[CLS] sparse autoencoders token")


# -------------------------------------------------------------------------------------------------
# The served view in a real browser

CHROMIUM = shutil.which("chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


def test_served_router_routes_and_its_duplicates_select_in_the_browser(analysis, tmp_path):
    """In chromium: a typed prompt comes back on the expert colours with the legend beside it, the
    duplicates table shows ids as plain integers, and clicking a twin selects it in the browser."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; CI installs it)")
    from playwright.sync_api import expect, sync_playwright

    start = time.perf_counter()
    wide = RouterAnalysis(**{**vars(analysis), "expert_width": 4096, "n_duplicate_pairs": 2,
                             "duplicates": [(1234, 12345, 0.95), (2, 4100, 0.93)]})
    browsers: list[StubBrowser] = []

    def session():
        browsers.append(StubBrowser())
        return RouterInspector(wide, FakeRunner(), browser=browsers[-1])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = pn.serve(session, port=port, address="127.0.0.1", threaded=True, show=False)
    try:
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            page = chromium.new_page(viewport={"width": 1400, "height": 1100})
            deadline = time.monotonic() + 30
            while True:  # the server thread starts asynchronously
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            prompt = page.locator('input[placeholder="Type a prompt, then Enter or Route"]')
            prompt.fill("which expert takes which token")
            prompt.press("Enter")
            page.wait_for_selector(".wb-route")
            expected = FakeRunner().run("which expert takes which token").expert_T.tolist()
            experts = page.locator(".wb-route").evaluate_all("spans => spans.map(s => +s.dataset.expert)")
            assert experts == expected
            backgrounds = page.locator(".wb-legend-item > span").evaluate_all(
                "spans => spans.map(s => getComputedStyle(s).backgroundColor)")
            assert backgrounds == [f"rgb({int(c[1:3], 16)}, {int(c[3:5], 16)}, {int(c[5:7], 16)})"
                                   for c in expert_colors(E)]

            twin = page.locator('.tabulator-cell[tabulator-field="twin"]').first
            expect(twin).to_have_text("12345")  # an id, not "12,345"
            twin.click()
            expect(page.get_by_text("Latent 12345 selected in the feature browser")).to_be_visible()
            assert browsers[-1].calls[-1] == ("select", 12345)
            page.screenshot(path=tmp_path / "router.png", full_page=True)
            chromium.close()
    finally:
        server.stop()
    print(f"router browser test: {time.perf_counter() - start:.1f} s")
