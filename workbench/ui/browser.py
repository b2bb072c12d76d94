"""The feature browser: a table of every feature of an SAE and, for the one selected, its top
contexts, quantile samples, activation histogram, output-token effects and nearest features; an
overview of how often all features fire; and a prompt box that shows which features fire on typed
text.

    pn.extension("tabulator")
    browser = FeatureBrowser(FeatureIndex.load("runs/demo/features/topk"),
                             PromptRunner(model, tokenizer, "resid_post.2", sae))
    browser                      # a notebook cell; browser.select(42) shows feature 42

Any SAE, trained here or elsewhere (a SAELens or sparsify folder, or a hub id), in one line: it is
indexed on held-out text of the model and site its metadata records (or that you pass), once::

    FeatureBrowser.from_sae("tests/fixtures/saelens/topk_minilm")
    FeatureBrowser.from_sae("owner/repo", subfolder="blocks.8.hook_resid_post", model="gpt2")

One selection, by feature id: a table row, the id box (Enter or Tab commits it), a feature in the
prompt view (its table, or a token's hover card), a nearest feature, :meth:`FeatureBrowser.select`
and the ``feature`` parameter all show that feature in the detail panes, fill the id box with it,
turn the table to its page and highlight its row. Filtering by a latent group (``group_filter``: a
Switch SAE's expert, a Matryoshka level) keeps the shown feature if it is in the group and otherwise
shows the group's first feature in the table's order; selecting a feature of another group moves the
filter to that group. Bad input (an out-of-range id, an empty prompt) is shown as a message in the
page, never as a traceback, and the id box goes back to the feature shown.

Clicks on features inside HTML (prompt, nearest features) reach Python through
:class:`SelectableHTML`, a small JS component, so they work in a served app and in JupyterLab alike.

DOM hooks the browser tests rely on (``data-act`` is the activation formatted with ``.4g``):

- each top example: ``<div class="wb-context" data-feature="F" data-rank="R">`` (rank 0 first;
  examples whose window repeats one above are left out);
- each quantile sample: ``<div class="wb-sample" data-feature="F" data-quantile="Q">`` (Q = 0 is the
  lowest bucket);
- each token of either: ``<span class="wb-tok" data-act="0.123">tok</span>``; a token that does not
  start a word carries ``data-cont="1"`` and is drawn joined to the one before, with a thin seam;
- each prompt token: ``<span class="wb-prompt-tok" data-act=".." data-features="12:3.4 7:1.2">``
  (the selected feature's activation, and the features firing most at that token) inside a
  ``<span class="wb-tok-wrap">`` that also holds its hover card ``<span class="wb-tip">``;
- anything that selects a feature when clicked: ``data-select="F"`` (the prompt table's rows
  ``<tr class="wb-prompt-feature">``, the hover cards' links, the nearest features ``.wb-near``);
- messages: ``<div class="wb-message">``; the summary ``<div class="wb-summary" data-feature="F">``;
  the density overview ``<div class="wb-density">`` with its marker ``<line class="wb-marker">``.

Feature ids are written as plain integers everywhere ("1024", never "1,024").
"""
from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
import torch
from bokeh.models.widgets.tables import NumberFormatter

from ..eval.any_sae import DEFAULT_EVAL_TOKENS, prepare_sae
from ..eval.features import Example, FeatureIndex
from ..eval.prompt import PromptResult, PromptRunner
from .style import continues_word, token_label

NO_RUNNER = ("no model is loaded: pass prompt_runner=PromptRunner(model, tokenizer, site, sae) to "
             "FeatureBrowser to try prompts")
PAGE_SIZE = 20
"""Table rows per page."""
_SHADE = "255, 140, 0"
"""RGB of the token shading; its opacity is the activation over the feature's max."""
_HEADER_FILTERS = {  # the table's filter boxes under each column title
    "feature": {"type": "number", "func": "=", "placeholder": "id"},
    "top_tokens": {"type": "input", "func": "like", "placeholder": "search tokens"},
    "frequency": {"type": "number", "func": ">=", "placeholder": "≥"},
    "mean_act": {"type": "number", "func": ">=", "placeholder": "≥"},
    "max_act": {"type": "number", "func": ">=", "placeholder": "≥"},
    **{kind: {"type": "number", "func": "=", "placeholder": "="} for kind in ("expert", "level")},
}
_TITLES = {"top_tokens": "top tokens", "frequency": "freq", "mean_act": "mean", "max_act": "max"}
_WIDTHS = {"feature": 76, "frequency": 76, "mean_act": 64, "max_act": 60, "expert": 70, "level": 62}
"""Fixed column widths (px); top_tokens takes the rest of the table's width, and wraps."""
_TABLE_CSS = """
.tabulator {font-size: 13px}
.tabulator .tabulator-header {font-size: 12px}
.tabulator .tabulator-header .tabulator-col .tabulator-col-content {padding: 4px 4px !important}
.tabulator .tabulator-header .tabulator-col.tabulator-sortable .tabulator-col-title {padding-right: 14px !important}
.tabulator .tabulator-header .tabulator-col .tabulator-col-sorter {right: 0 !important}
.tabulator .tabulator-header .tabulator-col.empty {visibility: hidden}
.tabulator-cell[tabulator-field="top_tokens"] {overflow-wrap: anywhere}
"""
"""The table's type sizes, set so that it looks the same in JupyterLab (larger type) as served."""
_CSS = """
.wb-tokens {white-space: pre-wrap; font-family: monospace; line-height: 1.9; margin: 2px 0;
            overflow-wrap: anywhere}
.wb-tok, .wb-prompt-tok {border-radius: 2px}
.wb-tok[data-cont], .wb-prompt-tok[data-cont] {box-shadow: inset 1px 0 0 #8a8a8a}
.wb-tok-wrap {position: relative}
.wb-tip {display: none; position: absolute; left: 0; top: 100%; z-index: 20; min-width: 11em;
         background: #fff; color: #222; border: 1px solid #999; border-radius: 4px; padding: 4px 8px;
         box-shadow: 0 2px 8px rgba(0, 0, 0, .25); font: 12px/1.5 sans-serif; white-space: nowrap}
.wb-tok-wrap:hover .wb-tip, .wb-tok-wrap:focus-within .wb-tip {display: block}
.wb-tip table {border-collapse: collapse} .wb-tip td {padding: 0 6px 0 0}
.wb-link {color: #0645ad; cursor: pointer; text-decoration: underline}
.wb-link:hover {background: #e8eefc}
table.wb-prompt-features {border-collapse: collapse; margin-top: 6px}
table.wb-prompt-features td, table.wb-prompt-features th {padding: 1px 10px 1px 0; text-align: left}
tr.wb-prompt-feature {cursor: pointer} tr.wb-prompt-feature:hover {background: #e8eefc}
.wb-block {font-size: 13px}
.wb-block ol {margin: 2px 0; padding-left: 1.8em}
.wb-block li {display: flex; justify-content: space-between; gap: .6em}
.wb-block li code {overflow-wrap: anywhere; min-width: 0}
.wb-val {white-space: nowrap; font-variant-numeric: tabular-nums}
.wb-near-name {white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-width: 0}
"""


class SelectableHTML(pn.custom.JSComponent):
    """HTML in which a click on any element with ``data-select="F"`` (or Enter on it, when
    focused) calls ``on_select(F)`` in Python: in a served app and in a notebook alike."""

    object = param.String(default="", doc="The HTML shown.")

    _esm = """
    export function render({ model, el }) {
      const root = document.createElement("div");
      const draw = () => { root.innerHTML = model.object; };
      draw();
      model.on("object", draw);
      const pick = (event) => {
        const target = event.target.closest("[data-select]");
        if (target === null) return;
        event.preventDefault();
        model.send_msg({ feature: Number(target.dataset.select) });
      };
      root.addEventListener("click", pick);
      root.addEventListener("keydown", (event) => { if (event.key === "Enter") pick(event); });
      return root;
    }
    """

    def __init__(self, object: str = "", on_select: Callable[[int], None] | None = None, **params: Any):
        super().__init__(object=object, stylesheets=[_CSS], **params)
        self.on_select = on_select

    def _handle_msg(self, data: Any) -> None:
        if self.on_select is not None and isinstance(data, dict) and "feature" in data:
            self.on_select(int(data["feature"]))


class _TableGroup(param.Parameterized):
    group = param.Integer(default=None, allow_None=True)


class FeatureBrowser(pn.viewable.Viewer):
    """Browse the features of one SAE from its :class:`~workbench.eval.features.FeatureIndex`."""

    feature = param.Integer(default=0, doc="The feature shown.")
    group_filter = param.Integer(default=None, allow_None=True, doc="""
        List only the features of this latent group in the table: a Switch SAE's expert, a
        Matryoshka SAE's prefix level (None: all features). The shown feature changes to the
        group's first unless it is in the group.""")

    def __init__(self, index: FeatureIndex, prompt_runner: PromptRunner | None = None, **params: Any):
        if prompt_runner is not None and prompt_runner.sae.cfg.d_sae != index.d_sae:
            raise ValueError(f"the prompt runner's SAE has {prompt_runner.sae.cfg.d_sae} features but the index "
                             f"has {index.d_sae}; pass the SAE the index was built for")
        super().__init__(**params)
        self.index = index
        self.prompt_runner = prompt_runner
        self.prompt_result: PromptResult | None = None
        """The last prompt's latents, kept to reshade it when another feature is selected."""
        self._syncing = False  # set while the browser itself moves the table and the id box
        self._density = density_bars(index.frequency)
        self._unit_dec: torch.Tensor | None = None  # the runner's unit decoder rows, for a format-1 index

        table = feature_table(index)
        self._names = index.top_tokens(3)  # each feature's commonest tokens, shown beside its nearest features
        kind = index.groups.kind if index.groups is not None else None
        ids = {column: NumberFormatter(format="0") for column in ("feature", kind) if column}  # 1024, not 1,024
        self.table = pn.widgets.Tabulator(
            table, pagination="remote", page_size=PAGE_SIZE, selectable=1, disabled=True, show_index=False,
            sizing_mode="stretch_width", layout="fit_columns", header_filters=_HEADER_FILTERS,
            stylesheets=[_TABLE_CSS], titles={c: t for c, t in _TITLES.items() if c in table},
            widths={c: w for c, w in _WIDTHS.items() if c in table},
            formatters={**ids, "top_tokens": {"type": "textarea"}, "frequency": NumberFormatter(format="0.000%"),
                        "mean_act": NumberFormatter(format="0.000"), "max_act": NumberFormatter(format="0.000")})
        self._table_group = _TableGroup()
        """The group the table lists, set by the group_filter watcher once the table's page is one
        the filtered table has (a page past its end would leave the front end on a stale page)."""
        if kind is not None:
            self.table.add_filter(self._table_group.param.group, kind)
        self.param.watch(self._on_group_filter, "group_filter")
        self.param.watch(self._on_feature, "feature")
        self.table.param.watch(self._on_table_selection, "selection")

        self.feature_input = pn.widgets.TextInput(label="Feature id (Enter)", value=str(self.feature), width=130)
        self.feature_input.param.watch(lambda event: self._commit_id(event.new), "value")
        # Enter commits what is typed (value_input: Panel sets it after value, which a bad id resets).
        self.feature_input.param.watch(lambda event: self._commit_id(self.feature_input.value_input),
                                       "enter_pressed")

        self.message = pn.pane.HTML("", visible=False, sizing_mode="stretch_width")
        self.density = pn.pane.HTML(sizing_mode="stretch_width", stylesheets=[_CSS])
        self.summary = pn.pane.HTML(sizing_mode="stretch_width")
        self.histogram = pn.pane.HTML(width=350, stylesheets=[_CSS])
        self.effects = pn.pane.HTML(width=420, stylesheets=[_CSS])
        self.nearest = SelectableHTML(on_select=self.select, width=260, margin=(5, 10))
        self.contexts = pn.pane.HTML(sizing_mode="stretch_width", stylesheets=[_CSS])
        self.samples = pn.pane.HTML(sizing_mode="stretch_width", stylesheets=[_CSS])

        self.prompt_input = pn.widgets.TextInput(placeholder="Type a prompt and press Enter",
                                                 sizing_mode="stretch_width")
        self.prompt_button = pn.widgets.Button(label="Run", color="primary", width=80)
        self.prompt_button.on_click(lambda event: self.run_prompt())
        self.prompt_input.param.watch(lambda event: self.run_prompt(), "enter_pressed")
        self.prompt_pane = SelectableHTML(_message(NO_RUNNER) if prompt_runner is None else "",
                                          on_select=self.select, sizing_mode="stretch_width", margin=(5, 10))

        left = pn.Column(
            self.density, self.feature_input, self.message, self.table,
            pn.pane.Markdown("### Try a prompt"),
            pn.Row(self.prompt_input, self.prompt_button, sizing_mode="stretch_width"), self.prompt_pane,
            sizing_mode="stretch_width", min_width=500, max_width=680)
        right = pn.Column(
            self.summary, pn.FlexBox(self.histogram, self.effects, self.nearest, gap="8px 24px",
                                     sizing_mode="stretch_width"),
            pn.pane.Markdown("### Top activations"), self.contexts,
            pn.pane.Markdown("### Samples by activation quantile"), self.samples,
            sizing_mode="stretch_width", min_width=420)
        # Side by side when there is room for both (about 950 px), else the detail below the table:
        # a notebook's output area with the file browser open is narrower than the window.
        left.styles = {"flex": "1 1 500px"}
        right.styles = {"flex": "1 1 420px"}
        self._layout = pn.FlexBox(left, right, flex_wrap="wrap", align_items="flex-start", gap="0 16px",
                                  sizing_mode="stretch_width")
        self._render(self.index.check_feature(self.feature))
        if self.group_filter is not None:  # FeatureBrowser(index, group_filter=2)
            self.param.trigger("group_filter")
        else:
            self._sync_controls()

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
        """Show feature ``f`` (its row highlighted on its page of the table; a group filter that
        hides it moves to its group); an invalid id leaves the view as it is and says why."""
        try:
            f = self.index.check_feature(f)
        except (IndexError, TypeError) as exc:
            self.show_message(str(exc))
            self._sync_controls()
            return
        self.message.visible = False
        if f == self.feature:
            self._sync_controls()  # nothing to redraw, but the table may be on another page
        else:
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

    # ---------------------------------------------------------------------------------------------
    # The one selection

    def _on_feature(self, event: param.parameterized.Event) -> None:
        try:
            f = self.index.check_feature(event.new)
        except (IndexError, TypeError) as exc:  # `browser.feature = 9000`: say why, keep the view
            self.show_message(str(exc))
            with param.parameterized.discard_events(self):
                self.feature = event.old
            self._sync_controls()
            return
        self.message.visible = False
        self._render(f)
        groups, g = self.index.groups, self.group_filter
        if groups is not None and g is not None and int(groups.group_F[f]) != g:
            self.group_filter = int(groups.group_F[f])  # its watcher brings the row into view
        self._sync_controls()

    def _on_group_filter(self, event: param.parameterized.Event) -> None:
        g, groups = event.new, self.index.groups
        if groups is None:
            if g is None:
                self.message.visible = False
            else:
                self.show_message(f"group_filter={g}, but this is a {self.index.info['architecture']} SAE, "
                                  f"whose latents form no groups (experts or prefix levels)")
            return
        valid = g is not None and 0 <= g < groups.n_groups
        if g is not None and not valid:
            n = groups.n_groups
            self.show_message(f"{groups.kind} {g} is out of range: this SAE has {n} {groups.kind}s (0-{n - 1})")
        else:
            self.message.visible = False
        self._syncing = True
        try:
            if self.table.page != 1:
                self.table.page = 1  # before filtering: page 1 exists in any filtered table
            self._table_group.group = g
        finally:
            self._syncing = False
        if valid and int(groups.group_F[self.feature]) != g:
            view = self.table.current_view
            if len(view):  # the group's first feature in the table's order (its sort, its filters)
                self.feature = int(view["feature"].iloc[0])
                return
        self._sync_controls()

    def _on_table_selection(self, event: param.parameterized.Event) -> None:
        if self._syncing:
            return
        if event.new:
            self.select(int(self.table.value["feature"].iloc[event.new[0]]))
        else:  # a click on the highlighted row unselects it; the shown feature stays highlighted
            self._sync_controls()

    def _commit_id(self, text: str) -> None:
        """The id box was committed (Enter, Tab, or leaving it)."""
        if self._syncing:
            return
        text = (text or "").strip()
        try:
            f = int(text)
        except ValueError:
            self.show_message(f"{text!r} is not a feature id; type an integer 0-{self.index.d_sae - 1}")
            self._sync_controls()
            return
        self.select(f)

    def _sync_controls(self) -> None:
        """Make the id box, the table's page and its highlighted row show the shown feature."""
        f = self.feature
        self._syncing = True
        try:
            if self.feature_input.value != str(f) or self.feature_input.value_input != str(f):
                self.feature_input.param.update(value=str(f), value_input=str(f))
            page = page_of(self.table.current_view["feature"].to_numpy(), f, PAGE_SIZE)
            if page is None:  # filtered out (a header filter the user typed)
                if self.table.selection:
                    self.table.selection = []
                return
            if self.table.page != page:
                self.table.page = page
            if self.table.selection != [f]:
                self.table.selection = [f]  # indices into table.value, whose row f is feature f
        finally:
            self._syncing = False

    # ---------------------------------------------------------------------------------------------
    # The panes

    def _render(self, f: int) -> None:
        index = self.index
        max_act = float(index.max_act[f])
        self.summary.object = summary_html(index, f)
        self.density.object = density_svg(*self._density, index.frequency, f)
        self.histogram.object = histogram_svg(*index.histogram(f))
        self.effects.object = effects_html(index.output_effects(f))
        self.nearest.object = nearest_html(self._nearest(f), index, self._names)
        self.contexts.object = contexts_html(index.top(f, distinct=True), max_act)
        self.samples.object = samples_html(index.quantile_samples(f, distinct=True), index.quantile_edges(f).tolist(),
                                           max_act)
        if self.prompt_result is not None:
            self._show_prompt()

    def _nearest(self, f: int) -> list[tuple[int, float]] | None:
        """The index's nearest features; for an index built before it kept them, the prompt
        runner's SAE's, if there is one."""
        near = self.index.nearest(f)
        if near is not None or self.prompt_runner is None:
            return near
        if self._unit_dec is None:
            W = self.prompt_runner.sae.W_dec.detach().float().cpu()
            self._unit_dec = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos_F = self._unit_dec @ self._unit_dec[f]
        cos_F[f] = -math.inf
        values, ids = cos_F.topk(min(self.index.cfg.n_nearest, self.index.d_sae - 1))
        return list(zip(ids.tolist(), values.tolist()))

    def _show_prompt(self) -> None:
        f = self.feature
        self.prompt_pane.object = prompt_html(self.prompt_result, f, float(self.index.max_act[f]))


def feature_table(index: FeatureIndex) -> pd.DataFrame:
    """One row per feature, row f for feature f: its id, the tokens it fires on most (searchable),
    firing frequency, mean and max activation, and its group (a Switch SAE's ``expert``, a
    Matryoshka SAE's prefix ``level``) if it has one."""
    columns = {"feature": torch.arange(index.d_sae).numpy(),
               "top_tokens": [" ".join(tokens) for tokens in index.top_tokens()],
               "frequency": index.frequency.numpy(), "mean_act": index.mean_act.numpy(),
               "max_act": index.max_act.numpy()}
    if index.groups is not None:
        columns[index.groups.kind] = index.groups.group_F.numpy()
    return pd.DataFrame(columns)


def page_of(view_features: np.ndarray, f: int, page_size: int = PAGE_SIZE) -> int | None:
    """The page (from 1) of the table's current view (its features in display order) that holds
    feature ``f``; None when the view leaves it out."""
    where = np.flatnonzero(np.asarray(view_features) == f)
    return int(where[0]) // page_size + 1 if len(where) else None


# -------------------------------------------------------------------------------------------------
# HTML of the panes (plain functions of the index, so each can be checked without a browser)


def _message(text: str) -> str:
    return f'<div class="wb-message" style="color:#a00">{html.escape(text, quote=False)}</div>'


def token_span(token: str, act: float, max_act: float, *, cls: str = "wb-tok", center: bool = False,
               continuation: bool = False, extra: str = "") -> str:
    """One token in running text, shaded by ``act / max_act``: the browser's only way of showing
    a token in context (top examples, samples, prompts)."""
    alpha = min(max(act / max_act, 0.0), 1.0) if max_act > 0 else 0.0
    style = f"background:rgba({_SHADE},{alpha:.2f})" + (";outline:1px solid #444" if center else "")
    cont = ' data-cont="1"' if continuation else ""
    return (f'<span class="{cls}" data-act="{act:.4g}"{cont}{extra} style="{style}">'
            f"{html.escape(token)}</span>")


def _example_div(example: Example, max_act: float, cls: str, attrs: str) -> str:
    tokens = example.tokens
    spans = "".join(token_span(tok, act, max_act, center=i == example.center,
                               continuation=continues_word(tokens, i), extra=f' title="{act:.4g}"')
                    for i, (tok, act) in enumerate(zip(tokens, example.token_acts)))
    return (f'<div class="{cls} wb-tokens" {attrs}><b style="display:inline-block;width:4.5em">'
            f"{example.activation:.3g}</b>{spans}</div>")


def summary_html(index: FeatureIndex, f: int) -> str:
    parts = []
    if index.groups is not None:
        parts.append(f"<b>{index.groups.kind} {int(index.groups.group_F[f])}</b>")
    parts += [f"fires on {float(index.frequency[f]):.3%} of {index.n_tokens:,} tokens",
              f"mean {float(index.mean_act[f]):.3g}", f"max {float(index.max_act[f]):.3g}"]
    return (f'<div class="wb-summary" data-feature="{f}"><h3 style="margin:4px 0">Feature {f}</h3>'
            f'{" · ".join(parts)}</div>')


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
        if not buckets[q]:  # a feature that fired on fewer tokens than there are buckets
            continue
        parts.append(f"<div><small>quantile {q + 1} of {len(buckets)}: activations "
                     f"{edges[q]:.3g} to {edges[q + 1]:.3g}</small></div>")
        parts.extend(_example_div(ex, max_act, "wb-sample", f'data-feature="{ex.feature}" data-quantile="{q}"')
                     for ex in reversed(buckets[q]))
    return "".join(parts)


# -------------------------------------------------------------------------------------------------
# Plots: small inline SVG bar charts with a count axis


def nice_ticks(top: int, n: int = 3) -> list[int]:
    """Counts to label an axis from 0 to ``top`` with: 0 and whole round steps (1, 2 or 5 times a
    power of ten), the largest step that still gives ``n`` steps (so n + 1 to 2.5 n + 1 ticks), the
    last at most ``top``."""
    if top <= 0:
        return [0]
    raw = max(top / n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = max(m * power for m in (1, 2, 5) if m * power <= raw)
    return list(range(0, int(top) + 1, int(step)))


def _bar_chart(counts: list[int], x_ticks: list[tuple[float, str]], *, x_title: str, y_title: str,
               bar_titles: list[str], width: int, height: int, marker: tuple[float, str] | None = None) -> str:
    """Bars of ``counts`` over equal-width slots, ``x_ticks`` as (fraction of the x axis, label),
    a count axis with round ticks, and an optional marker line at a fraction of the x axis."""
    left, right, top_pad, bottom = 42, 10, 14, 34
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    y0 = top_pad + plot_h
    top = max(max(counts), 1)
    ticks = nice_ticks(top)
    scale = plot_h / top
    parts = []
    for value in ticks:  # the count axis: grid lines and labels
        y = y0 - value * scale
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>'
                     f'<text class="wb-ytick" x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                     f"{value:,}</text>")
    bar_w = plot_w / len(counts)
    for i, (count, title) in enumerate(zip(counts, bar_titles)):
        h = count * scale
        parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{y0 - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
                     f'height="{h:.1f}" fill="rgb({_SHADE})"><title>{html.escape(title)}</title></rect>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y0}" y2="{y0}" stroke="#444"/>'
                 f'<line x1="{left}" x2="{left}" y1="{top_pad}" y2="{y0}" stroke="#444"/>')
    for fraction, label in x_ticks:
        x = left + fraction * plot_w
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y0 + 4}" stroke="#444"/>'
                     f'<text class="wb-xtick" x="{x:.1f}" y="{y0 + 15}" font-size="10" text-anchor="middle">'
                     f"{html.escape(label)}</text>")
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 3}" font-size="11" text-anchor="middle">'
                 f"{html.escape(x_title)}</text>"
                 f'<text x="10" y="{top_pad + plot_h / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {top_pad + plot_h / 2})">{html.escape(y_title)}</text>')
    if marker is not None:
        fraction, label = marker
        x = left + min(max(fraction, 0.0), 1.0) * plot_w
        anchor = "end" if fraction > 0.7 else "start"
        dx = -3 if anchor == "end" else 3
        parts.append(f'<line class="wb-marker" x1="{x:.1f}" x2="{x:.1f}" y1="{top_pad - 4}" y2="{y0}" '
                     f'stroke="#c00" stroke-width="2"/><text x="{x + dx:.1f}" y="{top_pad - 4}" font-size="10" '
                     f'fill="#c00" text-anchor="{anchor}">{html.escape(label)}</text>')
    return f'<svg width="{width}" height="{height}" style="overflow:visible">{"".join(parts)}</svg>'


def _tick_indices(n_edges: int, most: int = 6) -> list[int]:
    """Up to ``most`` evenly spread indices of ``n_edges`` edges, the first and the last included."""
    if n_edges <= most:
        return list(range(n_edges))
    step = math.ceil((n_edges - 1) / (most - 1))
    picked = list(range(0, n_edges - 1, step))
    if n_edges - 1 - picked[-1] < step / 2:
        picked.pop()
    return picked + [n_edges - 1]


def histogram_svg(counts: torch.Tensor, edges: torch.Tensor, width: int = 340, height: int = 150) -> str:
    """The activation histogram as an inline SVG bar chart: one bar per log-spaced bin, equal widths
    (so the x axis is logarithmic) labelled at several bin edges, a count axis, and each bin's range
    and count on hover."""
    if not len(counts):
        return ""
    counts_l, edges_l = [int(c) for c in counts.tolist()], [float(e) for e in edges.tolist()]
    n = len(counts_l)
    ticks = [(i / n, f"{edges_l[i]:.2g}") for i in _tick_indices(n + 1)]
    titles = [f"{edges_l[i]:.3g} to {edges_l[i + 1]:.3g}: {c:,} tokens" for i, c in enumerate(counts_l)]
    chart = _bar_chart(counts_l, ticks, x_title="activation (log scale)", y_title="tokens", bar_titles=titles,
                       width=width, height=height)
    return f'<div class="wb-histogram wb-block"><b>Activations where it fires</b><br>{chart}</div>'


DENSITY_BINS_PER_DECADE = 4


def density_bars(frequency_F: torch.Tensor) -> tuple[list[int], float, float, int]:
    """The firing-frequency distribution of all features, on log10 bins a quarter decade wide:
    (counts, log10 of the first edge, of the last, number of features that never fired)."""
    freq = frequency_F.double().numpy()
    alive = freq[freq > 0]
    if not len(alive):
        return [], 0.0, 0.0, len(freq)
    b = DENSITY_BINS_PER_DECADE
    logs = np.log10(alive)
    lo = math.floor(float(logs.min()) * b) / b
    hi = max(math.ceil(float(logs.max()) * b) / b, lo + 1 / b)
    n_bins = round((hi - lo) * b)
    counts, _ = np.histogram(logs, bins=n_bins, range=(lo, hi))
    return counts.tolist(), lo, hi, int((freq == 0).sum())


def density_svg(counts: list[int], lo: float, hi: float, n_dead: int, frequency_F: torch.Tensor, f: int,
                width: int = 440, height: int = 120) -> str:
    """How often the features fire: the number of features per log10 firing-frequency bin, with
    feature ``f``'s frequency marked (as Neuronpedia's and SAEDashboard's density plots)."""
    n_features = len(frequency_F)
    freq = float(frequency_F[f])
    dead = f"; {n_dead:,} never fired" if n_dead else ""
    head = (f"<b>Firing frequency of all {n_features:,} features</b> "
            f"<small>(log10; {n_features - n_dead:,} fire{dead})</small>")
    if not counts:
        return f'<div class="wb-density wb-block">{head}</div>'
    span = hi - lo
    ticks = [((k - lo) / span, f"{k:g}") for k in range(math.ceil(lo), math.floor(hi) + 1)]
    step = 1 / DENSITY_BINS_PER_DECADE
    titles = [f"10^{lo + i * step:.2f} to 10^{lo + (i + 1) * step:.2f}: {c:,} features" for i, c in enumerate(counts)]
    if freq > 0:
        marker = ((math.log10(freq) - lo) / span, f"feature {f}: {freq:.3%}")
        note = ""
    else:
        marker, note = None, f' <small style="color:#c00">feature {f} never fired</small>'
    chart = _bar_chart(counts, ticks, x_title="log10 firing frequency", y_title="features", bar_titles=titles,
                       width=width, height=height, marker=marker)
    return f'<div class="wb-density wb-block" data-feature="{f}">{head}{note}<br>{chart}</div>'


def effects_html(effects: tuple[list[tuple[str, float]], list[tuple[str, float]]] | None) -> str:
    """The output tokens the decoder direction promotes and suppresses, side by side (one above
    the other when the pane is narrow), each token with its logit change on its line."""
    if effects is None:
        return _message("no output effects: the index was built without unembed_VD=unembedding(model)")

    def column(title: str, sign: str, rows: list[tuple[str, float]]) -> str:
        items = "".join(f'<li class="wb-effect" data-sign="{sign}"><code>{html.escape(token_label(tok))}</code>'
                        f'<span class="wb-val">{value:+.3g}</span></li>' for tok, value in rows)
        return f'<div style="flex:1 1 170px;min-width:0"><b>{title}</b><ol>{items}</ol></div>'

    promoted, suppressed = effects
    return (f'<div class="wb-effects wb-block" style="display:flex;flex-wrap:wrap;gap:4px 20px">'
            f'{column("promotes", "+", promoted)}{column("suppresses", "-", suppressed)}</div>')


def nearest_html(nearest: list[tuple[int, float]] | None, index: FeatureIndex,
                 names: list[list[str]] | None = None) -> str:
    """The features whose decoder directions are nearest, with their cosine, their group and the
    tokens they fire on most (``names``, from ``index.top_tokens(3)``); each selects itself when
    clicked."""
    if nearest is None:
        return _message("no nearest features: this index was built before they were kept; build it again")
    groups = index.groups
    if names is None:
        names = index.top_tokens(3)
    items = []
    for j, cos in nearest:
        group = f" <small>{groups.kind[0]}{int(groups.group_F[j])}</small>" if groups is not None else ""
        tokens = html.escape(" ".join(names[j]))
        items.append(f'<li class="wb-near" data-feature="{j}"><span class="wb-near-name"><a class="wb-link" '
                     f'data-select="{j}" tabindex="0" role="button">{j}</a>{group} <small title="{tokens}">{tokens}'
                     f'</small></span><span class="wb-val">{cos:.3f}</span></li>')
    return (f'<div class="wb-nearest wb-block"><b>Nearest by decoder cosine</b><ol>{"".join(items)}</ol>'
            f"</div>")


def prompt_html(result: PromptResult, f: int, max_act: float, n_features: int = 5) -> str:
    """The prompt's tokens shaded by feature ``f``; hovering a token shows the features firing most
    on it with their activations, each a link that selects it. Then the features firing most
    anywhere in the prompt, each row selecting its feature."""
    acts_TF = result.acts_TF
    top_vals_TK, top_ids_TK = acts_TF.topk(min(n_features, acts_TF.shape[1]), dim=1)
    tokens = result.tokens
    spans = []
    for t, token in enumerate(tokens):
        fired = [(int(i), float(v)) for i, v in zip(top_ids_TK[t], top_vals_TK[t]) if v > 0]
        listing = " ".join(f"{i}:{v:.3g}" for i, v in fired)
        act = float(acts_TF[t, f])
        rows = "".join(f'<tr class="wb-tip-feature" data-feature="{i}"><td><a class="wb-link" data-select="{i}" '
                       f'tabindex="0" role="button">feature {i}</a></td><td class="wb-val">{v:.3g}</td></tr>'
                       for i, v in fired) or '<tr><td colspan="2"><i>no feature fires here</i></td></tr>'
        tip = (f'<span class="wb-tip" role="tooltip"><b>{html.escape(token_label(token))}</b> · feature {f}: '
               f"{act:.3g}<br>firing most here:<table>{rows}</table></span>")
        span = token_span(token, act, max_act, cls="wb-prompt-tok", continuation=continues_word(tokens, t),
                          extra=f' data-features="{listing}" tabindex="0"')
        spans.append(f'<span class="wb-tok-wrap">{span}{tip}</span>')
    peak_F, where_F = acts_TF.max(dim=0)
    best = [int(i) for i in peak_F.argsort(descending=True)[:10] if peak_F[i] > 0]
    rows = "".join(f'<tr class="wb-prompt-feature" data-feature="{i}" data-select="{i}" tabindex="0">'
                   f'<td><span class="wb-link">{i}</span></td><td>{float(peak_F[i]):.3g}</td>'
                   f"<td><code>{html.escape(token_label(tokens[int(where_F[i])]))}</code></td></tr>" for i in best)
    return (f'<div class="wb-prompt wb-tokens" data-feature="{f}">{"".join(spans)}</div>'
            f"<small>shaded by feature {f}; hover a token for the features firing most on it, "
            f"click a feature to select it</small>"
            f'<table class="wb-prompt-features"><thead><tr><th>feature</th><th>max</th><th>at</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")
