"""The feature browser: a table of every feature of an SAE and, for the one selected, its top
contexts, quantile samples, activation histogram and output-token effects; plus a prompt box that
shows which features fire on typed text.

    pn.extension("tabulator")
    browser = FeatureBrowser(FeatureIndex.load("runs/demo/features/topk"),
                             PromptRunner(model, tokenizer, "resid_post.2", sae))
    browser                      # a notebook cell; browser.select(42) shows feature 42

Any SAE, trained here or elsewhere (a SAELens or sparsify folder, or a hub id), in one line: it is
indexed on held-out text of the model and site its metadata records (or that you pass), once::

    FeatureBrowser.from_sae("tests/fixtures/saelens/topk_minilm")
    FeatureBrowser.from_sae("owner/repo", subfolder="blocks.8.hook_resid_post", model="gpt2")

Selecting a feature (a table row, the id box, :meth:`FeatureBrowser.select` or the ``feature``
parameter) rewrites the detail panes only; the table is built once. Bad input (an out-of-range id,
an empty prompt) is shown as a message in the page, never as a traceback.

DOM hooks the browser tests rely on (``data-act`` is the activation formatted with ``.4g``):

- each top example: ``<div class="wb-context" data-feature="F" data-rank="R">`` (rank 0 first);
- each quantile sample: ``<div class="wb-sample" data-feature="F" data-quantile="Q">`` (Q = 0 is the
  lowest bucket);
- each token of either: ``<span class="wb-tok" data-act="0.123">tok</span>``;
- each prompt token: ``<span class="wb-prompt-tok" data-act=".." data-features="12:3.4 7:1.2">``
  (the selected feature's activation, and the features firing most at that token);
- messages: ``<div class="wb-message">``.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd
import panel as pn
import param
import torch
from bokeh.models.widgets.tables import NumberFormatter

from ..eval.any_sae import DEFAULT_EVAL_TOKENS, prepare_sae
from ..eval.features import Example, FeatureIndex
from ..eval.prompt import PromptResult, PromptRunner

NO_RUNNER = ("no model is loaded: pass prompt_runner=PromptRunner(model, tokenizer, site, sae) to "
             "FeatureBrowser to try prompts")
_SHADE = "255, 140, 0"
"""RGB of the token shading; its opacity is the activation over the feature's max."""
_TOKENS_STYLE = "white-space:pre-wrap;font-family:monospace;line-height:1.7;margin:2px 0"
_HEADER_FILTERS = {  # the table's filter boxes under each column title
    "feature": {"type": "number", "func": "=", "placeholder": "id"},
    "frequency": {"type": "number", "func": ">=", "placeholder": "at least"},
    "mean_act": {"type": "number", "func": ">=", "placeholder": "at least"},
    "max_act": {"type": "number", "func": ">=", "placeholder": "at least"},
    **{kind: {"type": "number", "func": "=", "placeholder": kind} for kind in ("expert", "level")},
    "top_tokens": {"type": "input", "func": "like", "placeholder": "search tokens"},
}


class FeatureBrowser(pn.viewable.Viewer):
    """Browse the features of one SAE from its :class:`~workbench.eval.features.FeatureIndex`."""

    feature = param.Integer(default=0, doc="The feature shown.")
    group_filter = param.Integer(default=None, allow_None=True, doc="""
        List only the features of this latent group in the table: a Switch SAE's expert, a
        Matryoshka SAE's prefix level (None: all features).""")

    def __init__(self, index: FeatureIndex, prompt_runner: PromptRunner | None = None, **params: Any):
        if prompt_runner is not None and prompt_runner.sae.cfg.d_sae != index.d_sae:
            raise ValueError(f"the prompt runner's SAE has {prompt_runner.sae.cfg.d_sae} features but the index "
                             f"has {index.d_sae}; pass the SAE the index was built for")
        super().__init__(**params)
        self.index = index
        self.prompt_runner = prompt_runner
        self.prompt_result: PromptResult | None = None
        """The last prompt's latents, kept to reshade it when another feature is selected."""

        self.table = pn.widgets.Tabulator(
            feature_table(index), pagination="remote", page_size=20, selectable=1, disabled=True,
            show_index=False, sizing_mode="stretch_width", header_filters=_HEADER_FILTERS,
            formatters={"frequency": NumberFormatter(format="0.000%"),
                        "mean_act": NumberFormatter(format="0.000"), "max_act": NumberFormatter(format="0.000")})
        if index.groups is not None:
            self.table.add_filter(self.param.group_filter, index.groups.kind)
        self.table.param.watch(self._on_table_selection, "selection")
        self.feature_input = pn.widgets.IntInput(label="Feature id", value=self.feature, width=140)
        self.feature_input.param.watch(lambda event: self.select(event.new), "value")

        self.message = pn.pane.HTML("", visible=False, sizing_mode="stretch_width")
        self.summary = pn.pane.HTML(sizing_mode="stretch_width")
        self.contexts = pn.pane.HTML(sizing_mode="stretch_width")
        self.samples = pn.pane.HTML(sizing_mode="stretch_width")
        self.histogram = pn.pane.HTML(width=360)
        self.effects = pn.pane.HTML(sizing_mode="stretch_width")

        self.prompt_input = pn.widgets.TextInput(placeholder="Type a prompt and press Enter",
                                                 sizing_mode="stretch_width")
        self.prompt_button = pn.widgets.Button(label="Run", color="primary", width=80)
        self.prompt_button.on_click(lambda event: self.run_prompt())
        self.prompt_input.param.watch(lambda event: self.run_prompt(), "enter_pressed")
        self.prompt_pane = pn.pane.HTML(_message(NO_RUNNER) if prompt_runner is None else "",
                                        sizing_mode="stretch_width")

        self._layout = pn.Row(
            pn.Column(pn.pane.Markdown("### Features"), self.feature_input, self.table,
                      pn.pane.Markdown("### Try a prompt"), pn.Row(self.prompt_input, self.prompt_button),
                      self.prompt_pane, width=520),
            pn.Column(self.message, self.summary, pn.Row(self.histogram, self.effects),
                      pn.pane.Markdown("### Top activations"), self.contexts,
                      pn.pane.Markdown("### Samples by activation quantile"), self.samples,
                      sizing_mode="stretch_width"),
            sizing_mode="stretch_width")
        self._show_feature()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    @classmethod
    def from_sae(cls, sae: str | Path, *, subfolder: str | None = None, model: str | None = None,
                 site: str | None = None, text: str | None = None, eval_tokens: int = DEFAULT_EVAL_TOKENS,
                 index_dir: str | Path | None = None, progress: bool = True) -> FeatureBrowser:
        """The browser of any SAE folder (ours, SAELens' or sparsify's) or hub id ("owner/repo",
        with ``subfolder`` for one SAE of a repo that holds several), wired to a prompt runner.

        The SAE is indexed on ``eval_tokens`` held-out tokens of ``text`` run through ``model`` at
        ``site``; each defaults to what the SAE's metadata records (SAELens' ``model_name``,
        ``hook_name``, ``context_size``), and ``text`` to the text it was trained on if it was trained
        here, else CPython's prose (offline; a SAELens ``dataset_path`` would need the network: pass
        ``text`` to use it). The index is saved, by default in the activation cache under a key of
        the SAE's files and the data, so opening the same SAE again is instant; see
        :func:`workbench.eval.any_sae.prepare_sae`, which does the work."""
        prepared = prepare_sae(sae, subfolder=subfolder, model=model, site=site, text=text,
                               eval_tokens=eval_tokens, index_dir=index_dir, progress=progress)
        return cls(FeatureIndex.load(prepared.index_dir), prepared.prompt_runner())

    def select(self, f: int) -> None:
        """Show feature ``f``; an invalid id leaves the view as it is and says why."""
        try:
            f = self.index.check_feature(f)
        except (IndexError, TypeError) as exc:
            self.show_message(str(exc))
            return
        self.message.visible = False
        self.feature = f

    def run_prompt(self, text: str | None = None) -> None:
        """Run ``text`` (default: the prompt box's text) and show which features fire on which token."""
        if text is None:
            text = self.prompt_input.value_input
        else:
            self.prompt_input.value = text
        if self.prompt_runner is None:
            self.prompt_pane.object = _message(NO_RUNNER)
            return
        try:
            self.prompt_result = self.prompt_runner.run(text)
        except Exception as exc:  # the UI boundary: a failed prompt is a message, not a traceback
            self.prompt_result = None
            self.prompt_pane.object = _message(str(exc) or type(exc).__name__)
            return
        self._show_prompt()

    def show_message(self, text: str) -> None:
        self.message.object = _message(text)
        self.message.visible = True

    @param.depends("feature", watch=True)
    def _show_feature(self) -> None:
        index = self.index
        try:
            f = index.check_feature(self.feature)
        except (IndexError, TypeError) as exc:
            self.show_message(str(exc))
            return
        self.message.visible = False
        max_act = float(index.max_act[f])
        self.summary.object = summary_html(index, f)
        self.contexts.object = contexts_html(index.top(f), max_act)
        self.samples.object = samples_html(index.quantile_samples(f), index.quantile_edges(f).tolist(), max_act)
        self.histogram.object = histogram_svg(*index.histogram(f))
        self.effects.object = effects_html(index.output_effects(f))
        if self.feature_input.value != f:
            self.feature_input.value = f
        if self.table.selection != [f]:
            self.table.selection = [f]
        if self.prompt_result is not None:
            self._show_prompt()

    @param.depends("group_filter", watch=True)
    def _check_group_filter(self) -> None:
        g, groups = self.group_filter, self.index.groups
        if g is None:
            self.message.visible = False
        elif groups is None:
            self.show_message(f"group_filter={g}, but this is a {self.index.info['architecture']} SAE, "
                              f"whose latents form no groups (experts or prefix levels)")
        elif not 0 <= g < groups.n_groups:
            n = groups.n_groups
            self.show_message(f"{groups.kind} {g} is out of range: this SAE has {n} {groups.kind}s (0-{n - 1})")
        else:
            self.message.visible = False

    def _on_table_selection(self, event: param.parameterized.Event) -> None:
        if event.new:
            self.select(int(self.table.value["feature"].iloc[event.new[0]]))

    def _show_prompt(self) -> None:
        f = self.index.check_feature(self.feature)
        self.prompt_pane.object = prompt_html(self.prompt_result, f, float(self.index.max_act[f]))


def feature_table(index: FeatureIndex) -> pd.DataFrame:
    """One row per feature: id, firing frequency, mean and max activation, its group (a Switch
    SAE's ``expert``, a Matryoshka SAE's prefix ``level``) if it has one, and the tokens it fires on
    most (searchable)."""
    columns = {"feature": torch.arange(index.d_sae).numpy(), "frequency": index.frequency.numpy(),
               "mean_act": index.mean_act.numpy(), "max_act": index.max_act.numpy()}
    if index.groups is not None:
        columns[index.groups.kind] = index.groups.group_F.numpy()
    columns["top_tokens"] = [" ".join(tokens) for tokens in index.top_tokens()]
    return pd.DataFrame(columns)


# -------------------------------------------------------------------------------------------------
# HTML of the panes (plain functions of the index, so each can be checked without a browser)


def _message(text: str) -> str:
    return f'<div class="wb-message" style="color:#a00">{html.escape(text)}</div>'


def _token_span(token: str, act: float, max_act: float, cls: str = "wb-tok", center: bool = False,
                extra: str = "") -> str:
    alpha = min(max(act / max_act, 0.0), 1.0) if max_act > 0 else 0.0
    style = f"background:rgba({_SHADE},{alpha:.2f})" + (";outline:1px solid #444" if center else "")
    return (f'<span class="{cls}" data-act="{act:.4g}"{extra} title="{act:.4g}" style="{style}">'
            f"{html.escape(token)}</span>")


def _example_div(example: Example, max_act: float, cls: str, attrs: str) -> str:
    spans = "".join(_token_span(tok, act, max_act, center=i == example.center)
                    for i, (tok, act) in enumerate(zip(example.tokens, example.token_acts)))
    return (f'<div class="{cls}" {attrs} style="{_TOKENS_STYLE}"><b style="display:inline-block;width:4.5em">'
            f"{example.activation:.3g}</b>{spans}</div>")


def summary_html(index: FeatureIndex, f: int) -> str:
    parts = [f"fires on {float(index.frequency[f]):.3%} of {index.n_tokens:,} tokens",
             f"mean {float(index.mean_act[f]):.3g}", f"max {float(index.max_act[f]):.3g}"]
    if index.groups is not None:
        parts.append(f"{index.groups.kind} {int(index.groups.group_F[f])}")
    return f'<div class="wb-summary" data-feature="{f}"><h3>Feature {f}</h3>{" · ".join(parts)}</div>'


def contexts_html(examples: list[Example], max_act: float) -> str:
    """The top examples, highest first, each token shaded by the feature's activation."""
    if not examples:
        return _message("this feature never fired on the indexed tokens")
    return "".join(_example_div(ex, max_act, "wb-context", f'data-feature="{ex.feature}" data-rank="{rank}"')
                   for rank, ex in enumerate(examples))


def samples_html(buckets: list[list[Example]], edges: list[float], max_act: float) -> str:
    """The quantile samples, highest bucket first, each headed by its activation range."""
    if not any(buckets):
        return ""
    parts = []
    for q in reversed(range(len(buckets))):
        parts.append(f"<div><small>quantile {q + 1} of {len(buckets)}: activations "
                     f"{edges[q]:.3g} to {edges[q + 1]:.3g}</small></div>")
        parts.extend(_example_div(ex, max_act, "wb-sample", f'data-feature="{ex.feature}" data-quantile="{q}"')
                     for ex in reversed(buckets[q]))
    return "".join(parts)


def histogram_svg(counts: torch.Tensor, edges: torch.Tensor, width: int = 340, height: int = 110) -> str:
    """The activation histogram as an inline SVG bar chart: one bar per log-spaced bin, equal widths
    (so the x axis is logarithmic), the bin's range and count on hover."""
    if not len(counts):
        return ""
    top = int(counts.max())
    bar_w = width / len(counts)
    bars = []
    for i, count in enumerate(counts.tolist()):
        h = (height - 20) * count / top
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{height - 20 - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="rgb({_SHADE})"><title>{float(edges[i]):.3g} to '
                    f"{float(edges[i + 1]):.3g}: {count}</title></rect>")
    labels = (f'<text x="0" y="{height - 4}" font-size="11">{float(edges[0]):.3g}</text>'
              f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{float(edges[-1]):.3g}</text>')
    return (f'<div class="wb-histogram"><small>activations where it fires (log-spaced bins)</small><br>'
            f'<svg width="{width}" height="{height}">{"".join(bars)}{labels}</svg></div>')


def effects_html(effects: tuple[list[tuple[str, float]], list[tuple[str, float]]] | None) -> str:
    """The output tokens the decoder direction promotes and suppresses, side by side."""
    if effects is None:
        return _message("no output effects: the index was built without unembed_VD=unembedding(model)")

    def column(title: str, sign: str, rows: list[tuple[str, float]]) -> str:
        items = "".join(f'<li class="wb-effect" data-sign="{sign}"><code>{html.escape(tok.strip() or repr(tok))}'
                        f"</code> {value:+.3g}</li>" for tok, value in rows)
        return f'<div style="flex:1"><small>{title}</small><ol style="margin:0">{items}</ol></div>'

    promoted, suppressed = effects
    return (f'<div class="wb-effects" style="display:flex;gap:1em">{column("promotes", "+", promoted)}'
            f'{column("suppresses", "-", suppressed)}</div>')


def prompt_html(result: PromptResult, f: int, max_act: float, n_features: int = 3) -> str:
    """The prompt's tokens shaded by feature ``f``, each listing the features firing most on it
    (on hover), then the features firing most anywhere in the prompt."""
    acts_TF = result.acts_TF
    top_vals_TK, top_ids_TK = acts_TF.topk(min(n_features, acts_TF.shape[1]), dim=1)
    spans = []
    for t, token in enumerate(result.tokens):
        fired = [(int(i), float(v)) for i, v in zip(top_ids_TK[t], top_vals_TK[t]) if v > 0]
        listing = " ".join(f"{i}:{v:.3g}" for i, v in fired)
        spans.append(_token_span(token, float(acts_TF[t, f]), max_act, cls="wb-prompt-tok",
                                 extra=f' data-features="{listing}"'))
    peak_F, where_F = acts_TF.max(dim=0)
    best = [int(i) for i in peak_F.argsort(descending=True)[:10] if peak_F[i] > 0]
    rows = "".join(f'<tr class="wb-prompt-feature" data-feature="{i}"><td>{i}</td><td>{float(peak_F[i]):.3g}</td>'
                   f"<td><code>{html.escape(result.tokens[int(where_F[i])])}</code></td></tr>" for i in best)
    return (f'<div class="wb-prompt" data-feature="{f}" style="{_TOKENS_STYLE}">{"".join(spans)}</div>'
            f"<small>shaded by feature {f}; hover a token for the features firing most on it</small>"
            f'<table class="wb-prompt-features"><thead><tr><th>feature</th><th>max</th><th>at</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")
