"""The router inspector: where a Switch SAE sends each token, and how its experts share the work.

    inspector = RouterInspector(RouterAnalysis.load(folder), PromptRunner(model, tokenizer, site, sae),
                                browser=feature_browser)
    inspector                    # in a notebook cell (after pn.extension("tabulator")), or in the app

Type a prompt and each token is shown on its expert's colour, with the router's probability on
hover and a legend of the colours beside it. Below it, from the held-out analysis
(:func:`~workbench.eval.router.analyze_router`): expert load against the uniform 1/E, the per-token
router-entropy histogram, each expert's most frequent tokens and dead latents, the inter-expert
decoder similarity heatmap (a fixed cosine scale, 0 to 1) and the duplicate features. Choosing an
expert (the selector, or clicking its bar) sets ``browser.group_filter``, so the feature browser
then lists that expert's features only; clicking a duplicate pair's latent calls
``browser.select(latent)``.

Every expert-coloured element (prompt tokens, legend, load bars, table swatches) takes its colour
from :func:`expert_colors`, and every token shown on its own from :func:`display_token`.

DOM hooks the browser test relies on: each prompt token is
``<span class="wb-route" data-expert="E" data-prob="0.87" title="expert E, p=0.87">tok</span>``;
each legend entry ``<span class="wb-legend-item" data-expert="E">``; messages are
``<div class="wb-message">``; each expert's table row is
``<tr class="wb-expert-row" data-expert="E">``; the duplicate pairs are a Tabulator whose cells
are ``.tabulator-cell[tabulator-field="latent"]`` and ``[tabulator-field="twin"]``.
"""
from __future__ import annotations

import html
from typing import Any

import pandas as pd
import panel as pn
import param
from bokeh.models import (
    ColorBar,
    ColumnDataSource,
    FixedTicker,
    HoverTool,
    LinearColorMapper,
    NumberFormatter,
    Span,
    TapTool,
)
from bokeh.palettes import Viridis256
from bokeh.plotting import figure
from bokeh.transform import transform

from ..eval.router import RouterAnalysis
from .style import SEAM, continues_word, expert_colors, text_color, token_label

SHOWN_DUPLICATES = 50
"""Duplicate pairs listed (the analysis keeps more; the total is always shown)."""

_COSINE_RANGE = (0.0, 1.0)
"""The heatmap's fixed colour scale. A cell is the mean, over expert i's latents, of each one's
best decoder cosine with expert j's latents: a cosine lies in [-1, 1], but the best of W unrelated
directions is below 0 only if all W are (odds 2^-W for random ones), so with experts of tens to
thousands of latents the cells lie in [0, 1], 1 meaning every latent of i has an exact copy in j;
the same units as the duplicate threshold (0.9). A fixed scale makes SAEs and runs comparable by
colour and shows a narrow spread (say 0.19 to 0.27) as the small difference it is; a cell below 0
(a one-latent expert could give one) takes the lowest colour and shows its value on hover."""


def display_token(token: str) -> str:
    """A token of the router analysis shown on its own (:func:`~workbench.ui.style.token_label`). An
    analysis saved before its tokens were made readable kept ``tokenizer.decode``'s "##ing"; the
    marker is taken off ("##" and "###" themselves stay)."""
    if token.startswith("##") and len(token) > 2 and token[2] != "#":
        token = token[2:]
    return token_label(token)


class RouterInspector(pn.viewable.Viewer):
    """A Switch SAE's routing: a prompt coloured by expert plus the held-out router statistics.

    ``analysis`` may be None (no analysis was built yet: only the prompt view is shown, with a note
    on how to build it); ``prompt_runner`` is a :class:`~workbench.eval.prompt.PromptRunner` over the
    Switch SAE, None when no model is loaded; ``browser`` is a feature browser whose
    ``group_filter`` follows the chosen expert and whose ``select(f)`` shows a duplicate's latent.
    """

    expert = param.Integer(default=None, allow_None=True, bounds=(0, None), doc="""
        The expert being inspected, None for all. Its bar, table row, legend entry and prompt
        tokens are highlighted, and the browser's ``group_filter`` is set to it.""")

    def __init__(self, analysis: RouterAnalysis | None, prompt_runner: Any = None, browser: Any = None,
                 **params: Any):
        super().__init__(**params)
        self.analysis, self.prompt_runner, self.browser = analysis, prompt_runner, browser
        self.result: Any = None  # the last PromptResult routed, redrawn when the chosen expert changes
        self.prompt_input = pn.widgets.TextInput(label="Prompt", placeholder="Type a prompt, then Enter or Route",
                                                 disabled=prompt_runner is None, sizing_mode="stretch_width")
        self.route_button = pn.widgets.Button(label="Route", color="primary", disabled=prompt_runner is None,
                                              align="end")
        self.tokens_pane = pn.pane.HTML(self._prompt_hint(), sizing_mode="stretch_width")
        self.legend_pane = pn.pane.HTML(self._legend_html(), width=190)
        self.route_button.on_click(lambda event: self.route(self.prompt_input.value_input))
        self.prompt_input.param.watch(lambda event: self.route(self.prompt_input.value_input), "enter_pressed")

        sections: list[Any] = [pn.Row(self.prompt_input, self.route_button, sizing_mode="stretch_width"),
                               pn.Row(self.tokens_pane, self.legend_pane, sizing_mode="stretch_width")]
        if analysis is None:
            sections.insert(0, pn.pane.HTML(_message(
                "No router analysis for this SAE yet: build it with <code>workbench index RUN_DIR</code> or "
                "<code>analyze_router(sae, store, tokenizer).save(folder)</code>, then open this view again.")))
        else:
            sections = [self._header(analysis), *sections, *self._analysis_views(analysis)]
        self._layout = pn.Column(*sections, sizing_mode="stretch_width")
        self.param.watch(self._on_expert, "expert")
        if isinstance(browser, param.Parameterized) and "group_filter" in browser.param:
            browser.param.watch(lambda event: setattr(self, "expert", event.new), "group_filter")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # ---------------------------------------------------------------------------------------------
    # The prompt

    def route(self, text: str) -> None:
        """Run the prompt runner on ``text`` and show its tokens coloured by expert; problems (no
        text, no model, a runner without a router) are shown as a message, never raised."""
        if self.prompt_runner is None:
            self.tokens_pane.object = self._prompt_hint()
            return
        if not text or not text.strip():
            self.tokens_pane.object = _message("Type a prompt to see which expert each token goes to.")
            return
        try:
            result = self.prompt_runner.run(text)
        except Exception as exc:  # the UI boundary: show the problem in place of a traceback
            self.tokens_pane.object = _message(f"Could not route this prompt: {html.escape(str(exc))}")
            return
        if result.expert_T is None or result.probs_TE is None:
            self.tokens_pane.object = _message("This SAE has no router; the router view needs a Switch SAE.")
            return
        self.result = result
        self.tokens_pane.object = self._routed_html()
        self.legend_pane.object = self._legend_html()

    def _routed_html(self) -> str:
        """The tokens as the runner gives them (readable text, as in the browser's contexts), each on
        its expert's colour; a piece that continues a word is joined to the one before, with the
        browser's seam and ``data-cont="1"``, instead of the 1px gap between words' pieces."""
        result = self.result
        colors = expert_colors(result.probs_TE.shape[1])
        tokens = list(result.tokens)
        spans = []
        for t, tok in enumerate(tokens):
            e = int(result.expert_T[t])
            p = float(result.probs_TE[t, e])
            faded = self.expert is not None and e != self.expert
            cont = continues_word(tokens, t)
            joint = f' data-cont="1" style="{SEAM};' if cont else ' style="margin-left:1px;'
            spans.append(f'<span class="wb-route" data-expert="{e}" data-prob="{p:.2f}" '
                         f'title="expert {e}, p={p:.2f}"{joint}background:{colors[e]};color:{text_color(colors[e])};'
                         f'opacity:{0.3 if faded else 1};padding:1px 0;border-radius:2px">'
                         f'{html.escape(tok)}</span>')
        return (f'<div class="wb-routed" style="white-space:pre-wrap;font-family:monospace;line-height:1.8">'
                f'{"".join(spans)}</div>')

    def _n_experts(self) -> int | None:
        if self.analysis is not None:
            return self.analysis.n_experts
        return None if self.result is None else int(self.result.probs_TE.shape[1])

    def _legend_html(self) -> str:
        """Expert → colour, with the routed prompt's token count per expert once there is one."""
        n_experts = self._n_experts()
        if n_experts is None:
            return ""
        counts = None if self.result is None else [int((self.result.expert_T == e).sum()) for e in range(n_experts)]
        items = []
        for e, color in enumerate(expert_colors(n_experts)):
            faded = self.expert is not None and e != self.expert
            count = "" if counts is None else f' <small style="color:#555">{counts[e]} tok</small>'
            items.append(f'<span class="wb-legend-item" data-expert="{e}" style="display:inline-block;width:5.5em;'
                         f'opacity:{0.3 if faded else 1}"><span style="display:inline-block;min-width:1.6em;'
                         f'text-align:center;background:{color};color:{text_color(color)};border-radius:2px">'
                         f'{e}</span>{count}</span>')
        return (f'<div class="wb-legend" style="font-size:12px;line-height:1.7"><b>expert</b><br>'
                f'{"".join(items)}</div>')

    def _prompt_hint(self) -> str:
        if self.prompt_runner is None:
            return _message("Load the model to route your own text: "
                            "<code>RouterInspector(analysis, PromptRunner(model, tokenizer, site, sae))</code>.")
        return _message("Type a prompt to see which expert each token goes to.")

    # ---------------------------------------------------------------------------------------------
    # The held-out analysis

    def _header(self, a: RouterAnalysis) -> pn.pane.Markdown:
        dead = int(a.dead_per_expert.sum())
        return pn.pane.Markdown(
            f"### Router: {a.n_experts} experts × {a.expert_width} latents\n"
            f"{a.n_tokens:,} held-out tokens · load balance E·Σ f·P = {a.load_balance:.3f} (1 is uniform) · "
            f"{dead:,} of {a.n_experts * a.expert_width:,} latents never fired", sizing_mode="stretch_width")

    def _analysis_views(self, a: RouterAnalysis) -> list[Any]:
        # Labels as values: the front end cannot show a None value ("all experts") as selected.
        self._expert_labels = ["all experts", *(f"expert {e}: {100 * float(a.expert_load[e]):.1f}% of tokens"
                                                for e in range(a.n_experts))]
        self.expert_select = pn.widgets.Select(label="Expert", options=self._expert_labels, width=280)
        self.expert_select.param.watch(self._on_select, "value")
        self.load_plot = pn.pane.Bokeh(self._load_figure(a))
        self.entropy_plot = pn.pane.Bokeh(self._entropy_figure(a))
        self.experts_pane = pn.pane.HTML(self._experts_html(), sizing_mode="stretch_width")
        self.heatmap_plot = pn.pane.Bokeh(self._heatmap_figure(a))
        duplicates = pn.Column(pn.pane.HTML(self._duplicates_summary(a), sizing_mode="stretch_width"),
                               sizing_mode="stretch_width")
        self.duplicates_table = None
        if a.duplicates:
            self.duplicates_table = self._duplicates_table(a)
            self.duplicate_note = pn.pane.HTML(
                "<small>Click a latent (or its twin) to show it in the feature browser.</small>",
                sizing_mode="stretch_width")
            duplicates.extend([self.duplicates_table, self.duplicate_note])
        return [self.expert_select, pn.Row(self.load_plot, self.entropy_plot), self.experts_pane,
                pn.Row(self.heatmap_plot, duplicates, sizing_mode="stretch_width")]

    def _load_figure(self, a: RouterAnalysis) -> figure:
        """Bars of f_i in expert colours (the legend of the prompt's colours) with P_i as dots and the
        uniform 1/E as a dashed line; clicking a bar chooses that expert."""
        self.load_source = ColumnDataSource({
            "expert": list(range(a.n_experts)), "load": a.expert_load.tolist(), "prob": a.mean_prob.tolist(),
            "dead": a.dead_per_expert.tolist(), "color": expert_colors(a.n_experts)})
        fig = figure(title="Expert load f (bars), mean router probability P (dots)", height=260, width=420,
                     x_axis_label="expert", y_axis_label="fraction of tokens", tools="tap,reset",
                     toolbar_location=None)
        bars = fig.vbar("expert", top="load", width=0.8, color="color", line_color="#555", source=self.load_source,
                        nonselection_fill_alpha=0.3)
        fig.scatter("expert", "prob", source=self.load_source, color="black", size=5)
        fig.add_layout(Span(location=1 / a.n_experts, dimension="width", line_dash="dashed", line_color="#c00"))
        # The same formats as the selector and the table: f in %, P to 3 decimals, counts as integers.
        fig.add_tools(HoverTool(renderers=[bars], tooltips=[("expert", "@expert{0}"), ("f", "@load{0.0%}"),
                                                            ("P", "@prob{0.000}"), ("dead latents", "@dead{0}")]))
        fig.select_one(TapTool).renderers = [bars]
        if a.n_experts <= 16:  # whole experts only, never "2.5"
            fig.xaxis.ticker = FixedTicker(ticks=list(range(a.n_experts)))
        fig.y_range.start = 0
        self.load_source.selected.on_change("indices", self._on_bar_tap)
        return fig

    def _entropy_figure(self, a: RouterAnalysis) -> figure:
        edges = a.entropy_edges.tolist()
        fig = figure(title=f"Router entropy per token (nats; ln E = {edges[-1]:.2f} is uniform)", height=260,
                     width=420, x_axis_label="entropy (nats)", y_axis_label="tokens", toolbar_location=None)
        fig.quad(left=edges[:-1], right=edges[1:], bottom=0, top=a.entropy_counts.tolist(), color="#4c72b0",
                 line_color="white")
        fig.y_range.start = 0
        return fig

    def _heatmap_figure(self, a: RouterAnalysis) -> figure:
        """Cell (i, j): mean over expert i's decoder rows of the best cosine with expert j's rows, on
        the fixed scale :data:`_COSINE_RANGE`; the diagonal (rows of the same expert) is the baseline
        to compare with. The value is on hover, and written in the cells for up to 8 experts."""
        E = a.n_experts
        sim = a.similarity.tolist()
        cells = [(i, j) for i in range(E) for j in range(E)]
        low, high = _COSINE_RANGE
        self.heatmap_source = ColumnDataSource({
            "i": [i for i, _ in cells], "j": [j for _, j in cells], "sim": [sim[i][j] for i, j in cells],
            "x": [str(j) for _, j in cells], "y": [str(i) for i, _ in cells],  # categorical axes want strings
            "label": [f"{sim[i][j]:.3f}" for i, j in cells],
            "ink": ["#ffffff" if sim[i][j] < 0.6 else "#000000" for i, j in cells]})  # on Viridis' dark/light end
        self.heatmap_mapper = LinearColorMapper(palette=Viridis256, low=low, high=high)
        labels = [str(e) for e in range(E)]
        fig = figure(title="Decoder similarity: mean best cosine of i's latents in j", height=400, width=460,
                     x_range=labels, y_range=list(reversed(labels)), x_axis_label="expert j (compared with)",
                     y_axis_label="expert i (its latents)", toolbar_location=None)
        cells_r = fig.rect("x", "y", width=1, height=1, source=self.heatmap_source, line_color=None,
                           fill_color=transform("sim", self.heatmap_mapper))
        fig.add_tools(HoverTool(renderers=[cells_r], tooltips=[("experts", "@i{0} → @j{0}"),
                                                               ("mean best cosine", "@sim{0.000}")]))
        if E <= 8:
            fig.text("x", "y", text="label", source=self.heatmap_source, text_color="ink", text_align="center",
                     text_baseline="middle", text_font_size="9pt")
        self.heatmap_colorbar = ColorBar(color_mapper=self.heatmap_mapper, width=12,
                                         ticker=FixedTicker(ticks=[low + k * (high - low) / 5 for k in range(6)]),
                                         title="decoder cosine (mean best match)", title_standoff=6)
        fig.add_layout(self.heatmap_colorbar, "right")
        if E > 16:  # the axis labels would overlap
            fig.xaxis.major_label_text_font_size = fig.yaxis.major_label_text_font_size = "0pt"
        return fig

    def _experts_html(self) -> str:
        a = self.analysis
        colors = expert_colors(a.n_experts)
        rows = []
        for e in range(a.n_experts):
            tokens = ", ".join(f"{html.escape(display_token(tok))}&nbsp;<small>({n:,})</small>"
                               for tok, n in a.top_tokens[e])
            chosen = ' class="wb-expert-row wb-selected" style="outline:2px solid #333"' if e == self.expert \
                else ' class="wb-expert-row"'
            rows.append(f'<tr{chosen} data-expert="{e}"><td><span style="background:{colors[e]};'
                        f'color:{text_color(colors[e])};padding:0 6px;border-radius:2px">{e}</span></td>'
                        f'<td>{100 * float(a.expert_load[e]):.1f}%</td><td>{float(a.mean_prob[e]):.3f}</td>'
                        f'<td>{int(a.dead_per_expert[e])}/{a.expert_width}</td>'
                        f'<td style="font-family:monospace">{tokens or "<i>no tokens</i>"}</td></tr>')
        return ('<table class="wb-experts"><thead><tr><th>expert</th><th>load f</th><th>mean P</th>'
                '<th>dead</th><th>most frequent tokens (count)</th></tr></thead><tbody>' + "".join(rows) +
                "</tbody></table>")

    def _duplicates_summary(self, a: RouterAnalysis) -> str:
        n_latents = a.n_experts * a.expert_width
        summary = (f"<b>{a.n_duplicate_pairs:,}</b> pairs of latents in different experts have decoder cosine "
                   f"&gt; {a.dup_threshold:g}; <b>{a.n_duplicated_latents:,}</b> of {n_latents:,} latents "
                   f"({100 * a.n_duplicated_latents / n_latents:.1f}%) have such a twin.")
        if a.duplicates:
            summary += f" The {min(len(a.duplicates), SHOWN_DUPLICATES)} most similar:"
        return f"<div class='wb-duplicates'>{summary}</div>"

    def _duplicates_table(self, a: RouterAnalysis) -> pn.widgets.Tabulator:
        """The most similar pairs, one per row; clicking a row's latent (or its expert, or the
        cosine) selects that latent in the browser, clicking its twin (or the twin's expert) the twin."""
        shown = a.duplicates[:SHOWN_DUPLICATES]
        W = a.expert_width
        frame = pd.DataFrame({"latent": [x for x, _, _ in shown], "expert": [x // W for x, _, _ in shown],
                              "twin": [y for _, y, _ in shown], "twin_expert": [y // W for _, y, _ in shown],
                              "cosine": [c for _, _, c in shown]})
        ids = NumberFormatter(format="0")  # ids, not quantities: no thousands separators
        table = pn.widgets.Tabulator(
            frame, disabled=True, selectable=1, show_index=False, pagination="local", page_size=10,
            sizing_mode="stretch_width", titles={"twin_expert": "twin's expert"},
            formatters={"latent": ids, "expert": ids, "twin": ids, "twin_expert": ids,
                        "cosine": NumberFormatter(format="0.000")})
        table.on_click(self._on_duplicate_click)
        return table

    # ---------------------------------------------------------------------------------------------
    # Choosing an expert, selecting a duplicate

    def select_feature(self, f: int) -> None:
        """Show latent ``f`` in the browser (``browser.select(f)``). If the browser lists one expert's
        latents only and ``f`` is another's, ``f``'s expert is chosen first, so the browser's table
        shows the latent it is showing."""
        if self.analysis is not None and self.expert is not None:
            self.expert = f // self.analysis.expert_width
        select = getattr(self.browser, "select", None)
        if callable(select):
            select(f)
        if getattr(self, "duplicate_note", None) is not None:
            where = "in the feature browser" if callable(select) else "(no feature browser is attached)"
            self.duplicate_note.object = f"<small>Latent {f} selected {where}.</small>"

    def _on_duplicate_click(self, event: Any) -> None:
        row = self.duplicates_table.value.iloc[event.row]
        self.select_feature(int(row["twin"] if event.column in ("twin", "twin_expert") else row["latent"]))

    def _on_select(self, event: param.parameterized.Event) -> None:
        position = self._expert_labels.index(event.new)
        self.expert = position - 1 if position else None

    def _on_bar_tap(self, attr: str, old: list[int], new: list[int]) -> None:
        self.expert = new[0] if new else None

    def _on_expert(self, event: param.parameterized.Event) -> None:
        e = event.new
        if self.browser is not None:
            self.browser.group_filter = e
        if self.analysis is not None:
            self.expert_select.value = self._expert_labels[0 if e is None else e + 1]
            self.load_source.selected.indices = [] if e is None else [e]
            self.experts_pane.object = self._experts_html()
        if self.result is not None:
            self.tokens_pane.object = self._routed_html()
        self.legend_pane.object = self._legend_html()


def _message(text: str) -> str:
    return f'<div class="wb-message" style="color:#555;font-style:italic">{text}</div>'
