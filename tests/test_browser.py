"""The prompt runner on the real MiniLM and the feature browser without a browser: what each pane's
HTML shows is checked against the FeatureIndex it was built from (tokens, activations, ranks), the
table's group filter against the experts, and bad input comes back as a message in the page."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import torch

from workbench.data.embedded import DEFAULT_MODEL, load_model
from workbench.data.harvest import harvest
from workbench.data.store import ActivationStore, CacheKey
from workbench.data.text import tokenize_contexts
from workbench.eval.features import build_feature_index, readable_tokens, unembedding
from workbench.eval.prompt import PromptRunner
from workbench.saes import build_sae, make_config
from workbench.ui.browser import (
    NO_RUNNER,
    PAGE_SIZE,
    FeatureBrowser,
    _tick_indices,
    density_bars,
    density_svg,
    histogram_svg,
    nearest_html,
    nice_ticks,
    page_of,
    prompt_html,
)
from workbench.ui.style import token_label

SITE, D, F = "resid_post.2", 384, 256
PROMPT = "The parser reads each line of the file and returns a list of tokens."
TEXTS = [f"{subject} {verb} the {thing} before {when}." for subject in ("The parser", "A function", "Each module")
         for verb in ("reads", "writes", "closes", "returns") for thing in ("file", "socket", "buffer", "list of names")
         for when in ("it returns", "the loop ends", "an error is raised")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def minilm():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def store(minilm, tmp_path_factory):
    """About 1,500 MiniLM activations at the site, special tokens left out as a run's harvest does."""
    model, tokenizer = minilm
    key = CacheKey(model=DEFAULT_MODEL, site=SITE, text="browser-test", n_tokens=1500, context_length=32)

    def produce(start: int):
        batches = tokenize_contexts(TEXTS * 4, tokenizer, context_length=32, progress=False)
        return harvest(model, SITE, (b for b in batches if int(b.seq_S[-1]) >= start),
                       exclude_special_ids=tokenizer.all_special_ids, progress=False)

    return ActivationStore.get_or_create(tmp_path_factory.mktemp("cache"), key, produce, progress=False)


@pytest.fixture(scope="module")
def topk():
    return build_sae(make_config("topk", d_in=D, d_sae=F, k=8, seed=0))


@pytest.fixture(scope="module")
def switch():
    return build_sae(make_config("switch", d_in=D, d_sae=F, k=8, n_experts=4, seed=0))


@pytest.fixture(scope="module")
def index(topk, store, minilm):
    model, tokenizer = minilm
    return build_feature_index(topk, store, tokenizer, unembed_VD=unembedding(model), progress=False)


@pytest.fixture(scope="module")
def switch_index(switch, store, minilm):
    return build_feature_index(switch, store, minilm[1], progress=False)


@pytest.fixture
def browser(index, topk, minilm):
    model, tokenizer = minilm
    return FeatureBrowser(index, PromptRunner(model, tokenizer, SITE, topk))


class Tags(HTMLParser):
    """Every element of a pane with the given class: its attributes, its text, and the wb-tok /
    wb-prompt-tok spans inside it."""

    def __init__(self, markup: str, cls: str):
        super().__init__()
        self.cls, self.found, self._depth = cls, [], 0
        self._span: dict | None = None
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if self.cls in classes and not self._depth:
            self.found.append({**attrs, "text": "", "spans": []})
            self._depth = 1
        elif self._depth:
            self._depth += 1
            if tag == "span" and {"wb-tok", "wb-prompt-tok"} & set(classes):
                self._span = {**attrs, "text": ""}
                self.found[-1]["spans"].append(self._span)

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1
        self._span = None

    def handle_data(self, data):
        if self._depth:
            self.found[-1]["text"] += data
            if self._span is not None:
                self._span["text"] += data


def hidden_at_site(model, tokenizer, text):
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states[3][0]  # resid_post.2 = after block 2


# -------------------------------------------------------------------------------------------------
# PromptRunner


def test_prompt_runner_gives_every_tokens_latents(minilm, topk):
    model, tokenizer = minilm
    result = PromptRunner(model, tokenizer, SITE, topk).run(PROMPT)
    ids = tokenizer(PROMPT)["input_ids"]
    assert result.token_ids.tolist() == ids
    assert result.tokens == readable_tokens(tokenizer, ids)
    assert result.tokens[0] == " [CLS]" and result.tokens[-1] == " [SEP]"
    assert "".join(result.tokens[1:-1]).strip() == "the parser reads each line of the file and returns a list of tokens ."
    assert result.acts_TF.shape == (len(ids), F)
    torch.testing.assert_close(result.acts_TF, topk.encode(hidden_at_site(model, tokenizer, PROMPT)),
                               rtol=1e-4, atol=1e-4)
    assert result.expert_T is None and result.probs_TE is None


def test_prompt_runner_routes_tokens_for_a_switch_sae(minilm, switch):
    model, tokenizer = minilm
    result = PromptRunner(model, tokenizer, SITE, switch).run(PROMPT)
    probs_TE, expert_T = switch.route(hidden_at_site(model, tokenizer, PROMPT))
    torch.testing.assert_close(result.probs_TE, probs_TE.detach(), rtol=1e-4, atol=1e-5)
    assert torch.equal(result.expert_T, expert_T)
    # A token's latents all lie in its own expert.
    fired_T, latent_T = result.acts_TF.max(dim=1)
    assert torch.equal(latent_T[fired_T > 0] // (F // 4), expert_T[fired_T > 0])


@pytest.mark.parametrize("text", ["", "   \n"])
def test_an_empty_prompt_is_refused(minilm, topk, text):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match="^type a prompt to see which features fire$"):
        PromptRunner(model, tokenizer, SITE, topk).run(text)


# -------------------------------------------------------------------------------------------------
# FeatureBrowser


def test_select_shows_the_indexs_top_contexts(browser, index):
    f = int(index.frequency.argmax())
    browser.select(f)
    assert browser.feature == f and browser.feature_input.value == str(f) and browser.table.selection == [f]
    contexts = Tags(browser.contexts.object, "wb-context").found
    top = index.top(f, distinct=True)
    assert len(contexts) == len(top) > 0
    for rank, (div, example) in enumerate(zip(contexts, top)):
        assert (div["data-feature"], div["data-rank"]) == (str(f), str(rank))
        assert [span["text"] for span in div["spans"]] == example.tokens
        assert [float(span["data-act"]) for span in div["spans"]] == pytest.approx(example.token_acts, rel=1e-3)
    assert f"Feature {f}" in browser.summary.object


def test_the_other_panes_show_the_features_samples_histogram_and_effects(browser, index):
    f = int(index.frequency.argmax())
    browser.select(f)
    samples = Tags(browser.samples.object, "wb-sample").found
    buckets = index.quantile_samples(f)
    expected = [(q, ex.tokens) for q in reversed(range(len(buckets))) for ex in reversed(buckets[q])]
    assert expected and [(int(d["data-quantile"]), [s["text"] for s in d["spans"]]) for d in samples] == expected
    counts, _ = index.histogram(f)
    assert browser.histogram.object.count("<rect") == len(counts)
    promoted, suppressed = index.output_effects(f)
    effects = Tags(browser.effects.object, "wb-effect").found
    assert [(e["data-sign"], e["text"]) for e in effects] == [
        (sign, f"{token_label(tok)}{value:+.3g}") for sign, rows in (("+", promoted), ("-", suppressed))
        for tok, value in rows]
    near = Tags(browser.nearest.object, "wb-near").found
    assert [int(n["data-feature"]) for n in near] == [j for j, _ in index.nearest(f)]


def test_choosing_a_table_row_selects_its_feature(browser, index):
    f = int((index.frequency > 0).nonzero()[1])
    browser.table.selection = [f]
    assert browser.feature == f
    assert f'data-feature="{f}" data-rank="0"' in browser.contexts.object


def test_an_out_of_range_feature_is_a_message_and_leaves_the_view(browser):
    browser.select(3)
    shown = browser.contexts.object
    browser.select(9000)
    assert browser.message.visible
    assert "feature 9000 is out of range: this SAE has 256 features (0-255)" in browser.message.object
    assert browser.feature == 3 and browser.contexts.object == shown
    browser.select(4)
    assert not browser.message.visible
    browser.feature_input.value = "-1"  # typed into the id box
    assert browser.message.visible and "feature -1 is out of range" in browser.message.object
    assert browser.feature == 4 and browser.feature_input.value == "4"  # the box shows the feature shown
    browser.feature_input.value = "x7"
    assert "'x7' is not a feature id; type an integer 0-255" in browser.message.object
    assert browser.feature_input.value == "4"
    browser.feature = 300  # the parameter too: a message, and the view stays
    assert browser.feature == 4 and "feature 300 is out of range" in browser.message.object


def test_group_filter_lists_only_that_experts_features(switch_index):
    browser = FeatureBrowser(switch_index)
    assert len(browser.table.current_view) == F
    browser.group_filter = 2
    view = browser.table.current_view
    assert len(view) == F // 4 and set(view["expert"]) == {2}
    assert view["feature"].tolist() == list(range(2 * F // 4, 3 * F // 4))
    # The shown feature was not in expert 2: the expert's first feature is shown and highlighted.
    assert browser.feature == 2 * F // 4 and browser.table.selection == [2 * F // 4] and browser.table.page == 1
    browser.group_filter = None
    assert len(browser.table.current_view) == F
    browser.group_filter = 7
    assert "expert 7 is out of range: this SAE has 4 experts (0-3)" in browser.message.object


def test_one_selection_by_feature_id(switch_index):
    """Whatever selects a feature, the table shows its page with its row highlighted, the id box
    and the detail show it, and a group filter that hides it moves to its group."""
    browser = FeatureBrowser(switch_index)
    f = 2 * PAGE_SIZE + 5  # on page 3
    browser.select(f)
    assert (browser.table.page, browser.table.selection, browser.feature_input.value) == (3, [f], str(f))
    assert f'data-feature="{f}"' in browser.summary.object

    browser.group_filter = 1  # feature f is in expert 0: expert 1's first feature replaces it
    first = F // 4
    assert browser.feature == first and browser.table.selection == [first] and browser.table.page == 1
    browser.table.page = 2  # the user turns the page; a row there is clicked (selection: rows of value)
    browser.table.selection = [first + PAGE_SIZE + 3]
    assert browser.feature == first + PAGE_SIZE + 3 and browser.feature_input.value == str(first + PAGE_SIZE + 3)
    browser.table.selection = []  # clicking the highlighted row again does not unselect it
    assert browser.table.selection == [first + PAGE_SIZE + 3]

    g = 3 * F // 4 + PAGE_SIZE + 1  # in expert 3, its page 2: the filter follows, the row is shown
    browser.select(g)
    assert browser.group_filter == 3 and browser.table.page == 2 and browser.table.selection == [g]
    browser.group_filter = 3  # unchanged group: the feature stays
    assert browser.feature == g
    browser.group_filter = None  # all features again: still g, now on its page of the whole table
    assert browser.feature == g and browser.table.page == g // PAGE_SIZE + 1 and browser.table.selection == [g]

    # The group's first feature follows the table's sort.
    browser.table.sorters = [{"field": "max_act", "dir": "desc"}]
    browser.group_filter = 1
    in_expert = switch_index.max_act[F // 4: F // 2]
    assert browser.feature == F // 4 + int(in_expert.argmax()) and browser.table.page == 1


def test_the_id_box_commits_on_enter_and_shows_its_message_each_time(switch_index):
    browser = FeatureBrowser(switch_index)
    box = browser.feature_input
    box.value_input = "77"  # typed, not committed yet: Enter commits it (as the front end does)
    box._process_event(SimpleNamespace(event_name="enter-pressed", value_input="77"))
    assert browser.feature == 77 and browser.table.page == 77 // PAGE_SIZE + 1
    for _ in range(2):  # the same bad id twice: the message both times, the box back on 77
        browser.message.visible = False
        box._process_event(SimpleNamespace(event_name="enter-pressed", value_input="900"))
        assert browser.message.visible and "feature 900 is out of range" in browser.message.object
        assert box.value == box.value_input == "77" and browser.feature == 77


def test_clicks_in_the_html_select_features(browser, index, minilm, topk):
    """Clicks on data-select elements (prompt table rows, a token's hover card, nearest features)
    come to Python as SelectableHTML messages."""
    browser.run_prompt(PROMPT)
    row = Tags(browser.prompt_pane.object, "wb-prompt-feature").found[2]
    browser.prompt_pane._handle_msg({"feature": int(row["data-select"])})
    assert browser.feature == int(row["data-feature"]) and browser.table.selection == [browser.feature]
    near = index.nearest(browser.feature)[0][0]
    browser.nearest._handle_msg({"feature": near})
    assert browser.feature == near and browser.feature_input.value == str(near)


def test_group_filter_lists_one_matryoshka_level(store, minilm):
    sae = build_sae(make_config("matryoshka_batchtopk", d_in=D, d_sae=F, k=8, seed=0))
    sae.threshold.fill_(0.5)
    browser = FeatureBrowser(build_feature_index(sae, store, minilm[1], progress=False))
    assert "level" in browser.table.value.columns
    browser.group_filter = 1  # the second prefix: latents F/16 to F/8 - 1
    view = browser.table.current_view
    assert view["feature"].tolist() == list(range(F // 16, F // 8)) and set(view["level"]) == {1}
    browser.select(F // 16)
    assert "level 1" in browser.summary.object
    browser.group_filter = 5
    assert "level 5 is out of range: this SAE has 5 levels (0-4)" in browser.message.object


def test_group_filter_on_an_sae_without_groups_is_a_message(index):
    browser = FeatureBrowser(index)
    browser.group_filter = 1
    assert browser.message.visible and "this is a topk SAE, whose latents form no groups" in browser.message.object


def test_a_prompt_shows_each_tokens_activation_and_follows_the_selection(browser, minilm, topk):
    model, tokenizer = minilm
    expected = PromptRunner(model, tokenizer, SITE, topk).run(PROMPT)
    f = int(expected.acts_TF.max(dim=0).values.argmax())  # a feature that fires on the prompt
    browser.select(f)
    browser.run_prompt(PROMPT)
    tokens = Tags(browser.prompt_pane.object, "wb-prompt").found[0]["spans"]
    assert [s["text"] for s in tokens] == expected.tokens
    assert [float(s["data-act"]) for s in tokens] == pytest.approx(expected.acts_TF[:, f].tolist(), rel=1e-3, abs=1e-4)
    top_at_0 = [int(pair.split(":")[0]) for pair in tokens[0]["data-features"].split()]
    assert top_at_0 == expected.acts_TF[0].topk(len(top_at_0)).indices.tolist()

    browser.prompt_runner = None  # selecting another feature reshades the last prompt without a model
    browser.select(f + 1)
    tokens = Tags(browser.prompt_pane.object, "wb-prompt").found[0]["spans"]
    assert [float(s["data-act"]) for s in tokens] == pytest.approx(expected.acts_TF[:, f + 1].tolist(), rel=1e-3, abs=1e-4)


def test_an_empty_prompt_or_a_missing_model_is_a_message(browser, index):
    browser.run_prompt("  ")
    assert "type a prompt to see which features fire" in browser.prompt_pane.object
    assert "wb-prompt-tok" not in browser.prompt_pane.object
    bare = FeatureBrowser(index)
    assert "no model is loaded" in bare.prompt_pane.object
    bare.run_prompt(PROMPT)
    assert "pass prompt_runner=PromptRunner(model, tokenizer, site, sae)" in bare.prompt_pane.object
    assert NO_RUNNER.startswith("no model is loaded")


def test_a_runner_for_another_sae_is_refused(index, minilm):
    model, tokenizer = minilm
    other = build_sae(make_config("topk", d_in=D, d_sae=512, k=8))
    with pytest.raises(ValueError, match="the prompt runner's SAE has 512 features but the index has 256"):
        FeatureBrowser(index, PromptRunner(model, tokenizer, SITE, other))


def test_the_table_is_searchable_by_the_tokens_a_feature_fires_on(index, switch_index):
    browser = FeatureBrowser(index)
    table = browser.table.value
    assert table.columns.tolist() == ["feature", "top_tokens", "frequency", "mean_act", "max_act"]
    assert FeatureBrowser(switch_index).table.value.columns.tolist() == [
        "feature", "top_tokens", "frequency", "mean_act", "max_act", "expert"]
    assert browser.table.layout == "fit_columns" and "top_tokens" not in browser.table.widths
    f = int(index.frequency.argmax())
    top_token = index.top(f)[0]
    assert table["top_tokens"][f].split()[0] == top_token.tokens[top_token.center].strip()
    assert browser.table.header_filters["top_tokens"]["func"] == "like"


# -------------------------------------------------------------------------------------------------
# The prompt view and the plots, as plain functions


def test_a_prompt_tokens_hover_card_lists_its_top_features_as_links(minilm, topk):
    model, tokenizer = minilm
    result = PromptRunner(model, tokenizer, SITE, topk).run("The ValueError was raised by the parser.")
    assert result.tokens[2:5] == [" value", "er", "ror"]
    f = int(result.acts_TF.max(dim=0).values.argmax())
    markup = prompt_html(result, f, 1.0)
    wraps = markup.split('<span class="wb-tok-wrap">')[1:]
    assert len(wraps) == len(result.tokens)
    top_vals_TK, top_ids_TK = result.acts_TF.topk(5, dim=1)
    for t, (wrap, token) in enumerate(zip(wraps, result.tokens)):
        card = wrap.split('<span class="wb-tip"', 1)[1].split("</table>")[0]
        fired = [i for i, v in zip(top_ids_TK[t].tolist(), top_vals_TK[t].tolist()) if v > 0]
        assert [int(i) for i in re.findall(r'data-select="(\d+)"', card)] == fired
        assert f"<b>{token_label(token)}</b> · feature {f}: {float(result.acts_TF[t, f]):.3g}" in card
        # Word pieces that continue a word ("er", "ror" of "valueerror") are marked, to be drawn joined.
        assert ('data-cont="1"' in wrap.split("wb-tip")[0]) == (t > 0 and not token.startswith(" "))
    rows = Tags(markup, "wb-prompt-feature").found
    peak_F = result.acts_TF.max(dim=0).values
    assert [int(r["data-select"]) for r in rows] == peak_F.argsort(descending=True)[:len(rows)].tolist()
    assert all(r["data-select"] == r["data-feature"] for r in rows)


def test_ids_and_tokens_are_written_one_way(index, switch_index):
    assert [token_label(t) for t in (" the", "er", " ", "\n", "")] == ["the", "er", "␣", "↵", "∅"]
    browser = FeatureBrowser(switch_index)
    formats = {name: f.format for name, f in browser.table.formatters.items() if hasattr(f, "format")}
    assert formats["feature"] == formats["expert"] == "0"  # 1024, not 1,024
    markup = nearest_html([(1024, 0.5)], SimpleNamespace(groups=None), {1024: ["x"]})
    assert ">1024</a>" in markup and "1,024" not in markup


def test_page_of_and_the_axis_ticks():
    view = [5, 9, 2, 40, 41]
    assert [page_of(view, f, page_size=2) for f in (5, 2, 41, 7)] == [1, 2, 3, None]
    assert nice_ticks(7) == [0, 2, 4, 6] and nice_ticks(1) == [0, 1] and nice_ticks(2) == [0, 1, 2]
    assert nice_ticks(230) == [0, 50, 100, 150, 200] and nice_ticks(1000) == [0, 200, 400, 600, 800, 1000]
    assert _tick_indices(4) == [0, 1, 2, 3]
    assert _tick_indices(21) == [0, 4, 8, 12, 16, 20] and _tick_indices(23) == [0, 5, 10, 15, 22]


def test_the_histogram_has_log_spaced_labels_and_a_count_axis():
    edges = 2.0 ** (torch.arange(21) / 4 - 2)  # 20 bins, a quarter octave each
    counts = torch.arange(20) * 3
    svg = histogram_svg(counts, edges)
    x_labels = re.findall(r'class="wb-xtick"[^>]*>([^<]+)<', svg)
    assert x_labels == [f"{float(edges[i]):.2g}" for i in _tick_indices(21)] and len(x_labels) >= 5
    assert re.findall(r'class="wb-ytick"[^>]*>([^<]+)<', svg) == ["0", "10", "20", "30", "40", "50"]
    assert svg.count("<rect") == 20 and "tokens" in svg and "activation (log scale)" in svg


def test_the_density_overview_marks_the_selected_feature():
    frequency = torch.tensor([0.0, 1e-3, 2e-3, 1e-2, 0.011, 0.5, 0.0])
    counts, lo, hi, n_dead = density_bars(frequency)
    assert sum(counts) == 5 and n_dead == 2 and (lo, hi) == (-3.0, -0.25)
    svg = density_svg(counts, lo, hi, n_dead, frequency, 3)
    assert re.findall(r'class="wb-xtick"[^>]*>([^<]+)<', svg) == ["-3", "-2", "-1"]
    x_of = {label: float(x) for x, label in re.findall(r'class="wb-xtick" x="([\d.]+)"[^>]*>([^<]+)<', svg)}
    marker_x = float(re.search(r'class="wb-marker" x1="([\d.]+)"', svg).group(1))
    assert marker_x == pytest.approx(x_of["-2"], abs=0.1)  # feature 3 fires on 1e-2 of the tokens
    assert "2 never fired" in svg
    assert "wb-marker" not in density_svg(counts, lo, hi, n_dead, frequency, 0)  # a dead feature: a note
