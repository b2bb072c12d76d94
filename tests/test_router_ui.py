"""The router inspector without a browser: a prompt comes back as one coloured span per token whose
expert and probability are the runner's, choosing an expert (selector, bar click, or the browser
itself) moves the feature browser's group filter, the analysis panes show the analysis' numbers,
and bad input is a message, never a traceback."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import NamedTuple

import panel as pn
import param
import pytest
import torch
from bokeh.models import Span

from workbench.data.embedded import DEFAULT_MODEL, load_model
from workbench.eval.prompt import PromptRunner
from workbench.eval.router import ENTROPY_BINS, RouterAnalysis
from workbench.saes import SwitchConfig, SwitchSAE
from workbench.ui.router import SHOWN_DUPLICATES, RouterInspector, expert_colors

E, W = 4, 16


class FakeResult(NamedTuple):
    tokens: list[str]
    token_ids: torch.Tensor
    acts_TF: torch.Tensor
    expert_T: torch.Tensor | None
    probs_TE: torch.Tensor | None


class FakeRunner:
    """Splits the prompt on spaces and routes each word with seeded random probabilities, like
    PromptRunner's result; ``router=False`` acts as a runner over an SAE without a router."""

    def __init__(self, router: bool = True):
        self.router = router

    def run(self, text: str) -> FakeResult:
        if not text.strip():
            raise ValueError("type a prompt to see which features fire")
        tokens = text.split(" ")
        probs_TE = torch.softmax(3 * torch.randn(len(tokens), E, generator=torch.Generator().manual_seed(len(text))), -1)
        expert_T = probs_TE.argmax(-1) if self.router else None
        return FakeResult(tokens, torch.arange(len(tokens)), torch.zeros(len(tokens), E * W), expert_T,
                          probs_TE if self.router else None)


class StubBrowser(param.Parameterized):
    group_filter = param.Integer(default=None, allow_None=True)


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
    assert [s["text"] for s in Spans(inspector.tokens_pane.object).spans] == ["another", "prompt", "here"]


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

    dups = inspector.duplicates_pane.object
    rows = re.findall(r'<tr class="wb-dup" data-a="(\d+)" data-b="(\d+)">', dups)
    assert [(int(a), int(b)) for a, b in rows] == [(a, b) for a, b, _ in analysis.duplicates[:SHOWN_DUPLICATES]]
    assert "<b>70</b> pairs" in dups and "<b>80</b> of 64 latents" in dups

    table = inspector.experts_pane.object
    assert "##ing" in table and "␣cat" in table and "↵" in table and "1/16" in table
    assert "load balance E·Σ f·P = 1.140" in inspector.__panel__()[0].object
    pn.panel(inspector).get_root()  # every Bokeh model builds


def test_expert_colors_are_distinct_for_64_experts():
    colors = expert_colors(64)
    assert len(set(colors)) == 64 and all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
    assert expert_colors(8) == colors[:8]  # an expert keeps its colour whatever E is
