"""The prompt runner on the real MiniLM and the feature browser without a browser: what each pane's
HTML shows is checked against the FeatureIndex it was built from (tokens, activations, ranks), the
table's group filter against the experts, and bad input comes back as a message in the page."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest
import torch

from workbench.data.embedded import DEFAULT_MODEL, load_model
from workbench.data.harvest import harvest
from workbench.data.store import ActivationStore, CacheKey
from workbench.data.text import tokenize_contexts
from workbench.eval.features import build_feature_index, readable_tokens, unembedding
from workbench.eval.prompt import PromptRunner
from workbench.saes import make_config, build_sae
from workbench.ui.browser import NO_RUNNER, FeatureBrowser

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
        if attrs.get("class") == self.cls:
            self.found.append({**attrs, "text": "", "spans": []})
            self._depth = 1
        elif self._depth:
            self._depth += 1
            if tag == "span" and attrs.get("class") in ("wb-tok", "wb-prompt-tok"):
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
    assert browser.feature == f and browser.feature_input.value == f and browser.table.selection == [f]
    contexts = Tags(browser.contexts.object, "wb-context").found
    top = index.top(f)
    assert len(contexts) == len(top) == index.cfg.n_top
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
    assert [e["text"].split()[0] for e in effects] == [tok.strip() for tok, _ in promoted + suppressed]


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
    browser.feature_input.value = -1  # typed into the id box
    assert browser.message.visible and "feature -1 is out of range" in browser.message.object
    assert browser.feature == 4


def test_group_filter_lists_only_that_experts_features(switch_index):
    browser = FeatureBrowser(switch_index)
    assert len(browser.table.current_view) == F
    browser.group_filter = 2
    view = browser.table.current_view
    assert len(view) == F // 4 and set(view["expert"]) == {2}
    assert view["feature"].tolist() == list(range(2 * F // 4, 3 * F // 4))
    browser.group_filter = None
    assert len(browser.table.current_view) == F
    browser.group_filter = 7
    assert "expert 7 is out of range: this SAE has 4 experts (0-3)" in browser.message.object


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


def test_the_table_is_searchable_by_the_tokens_a_feature_fires_on(index):
    browser = FeatureBrowser(index)
    table = browser.table.value
    assert table.columns.tolist() == ["feature", "frequency", "mean_act", "max_act", "top_tokens"]
    f = int(index.frequency.argmax())
    top_token = index.top(f)[0]
    assert table["top_tokens"][f].split()[0] == top_token.tokens[top_token.center].strip()
    assert browser.table.header_filters["top_tokens"]["func"] == "like"
