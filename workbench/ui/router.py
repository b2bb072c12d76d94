"""The router inspector: where a Switch SAE sends each token, and how its experts share the work.

    inspector = RouterInspector(RouterAnalysis.load(folder), PromptRunner(model, tokenizer, site, sae),
                                browser=feature_browser)
    inspector                    # in a notebook cell, or served inside the app

Type a prompt and each token is shown on its expert's colour, with the router's probability on
hover. Below it, from the held-out analysis (:func:`~workbench.eval.router.analyze_router`): expert
load against the uniform 1/E, the per-token router-entropy histogram, each expert's most frequent
tokens and dead latents, the inter-expert decoder similarity heatmap and the duplicate features.
Choosing an expert (the selector, or clicking its bar) sets ``browser.group_filter``, so the feature
browser then lists that expert's features only.

DOM hooks the browser test relies on: each prompt token is
``<span class="wb-route" data-expert="E" data-prob="0.87" title="expert E, p=0.87">tok</span>``;
messages are ``<div class="wb-message">``; each expert's table row is
``<tr class="wb-expert-row" data-expert="E">``; each duplicate pair is
``<tr class="wb-dup" data-a="A" data-b="B">``.
"""
from __future__ import annotations

import colorsys
import html
from typing import Any

import panel as pn
import param
from bokeh.models import ColorBar, ColumnDataSource, HoverTool, LinearColorMapper, Span, TapTool
from bokeh.palettes import Viridis256
from bokeh.plotting import figure
from bokeh.transform import transform

from ..eval.router import RouterAnalysis

SHOWN_DUPLICATES = 50
"""Duplicate pairs listed (the analysis keeps more; the total is always shown)."""
_GOLDEN = 0.381966  # 1 - 1/phi: successive hues never land close to each other
_LIGHTNESS = (0.80, 0.68, 0.88)  # light enough for black text on every colour


def expert_colors(n_experts: int) -> list[str]:
    """A distinct light background colour (hex) per expert: hues a golden angle apart, lightness
    cycling through three levels so that neighbouring experts differ in both, for up to ~64 experts."""
    colors = []
    for e in range(n_experts):
        r, g, b = colorsys.hls_to_rgb((e * _GOLDEN) % 1.0, _LIGHTNESS[e % len(_LIGHTNESS)], 0.65)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colors


class RouterInspector(pn.viewable.Viewer):
    """A Switch SAE's routing: a prompt coloured by expert plus the held-out router statistics.

    ``analysis`` may be None (no analysis was built yet: only the prompt view is shown, with a note
    on how to build it); ``prompt_runner`` is a :class:`~workbench.eval.prompt.PromptRunner` over the
    Switch SAE, None when no model is loaded; ``browser`` is a feature browser whose
    ``group_filter`` follows the chosen expert.
    """

    expert = param.Integer(default=None, allow_None=True, bounds=(0, None), doc="""
        The expert being inspected, None for all. Its bar, table row and prompt tokens are
        highlighted, and the browser's ``group_filter`` is set to it.""")

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
        self.route_button.on_click(lambda event: self.route(self.prompt_input.value_input))
        self.prompt_input.param.watch(lambda event: self.route(self.prompt_input.value_input), "enter_pressed")

        sections: list[Any] = [pn.Row(self.prompt_input, self.route_button, sizing_mode="stretch_width"),
                               self.tokens_pane]
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

    def _routed_html(self) -> str:
        result = self.result
        colors = expert_colors(result.probs_TE.shape[1])
        spans = []
        for t, tok in enumerate(result.tokens):
            e = int(result.expert_T[t])
            p = float(result.probs_TE[t, e])
            faded = self.expert is not None and e != self.expert
            spans.append(f'<span class="wb-route" data-expert="{e}" data-prob="{p:.2f}" '
                         f'title="expert {e}, p={p:.2f}" style="background:{colors[e]};'
                         f'opacity:{0.3 if faded else 1};padding:1px 0;margin-right:1px;border-radius:2px">'
                         f'{html.escape(tok)}</span>')
        return (f'<div class="wb-routed" style="white-space:pre-wrap;font-family:monospace;line-height:1.8">'
                f'{"".join(spans)}</div>')

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
        self.duplicates_pane = pn.pane.HTML(self._duplicates_html(a), sizing_mode="stretch_width")
        return [self.expert_select, pn.Row(self.load_plot, self.entropy_plot), self.experts_pane,
                pn.Row(self.heatmap_plot, self.duplicates_pane)]

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
        fig.add_tools(HoverTool(renderers=[bars], tooltips=[("expert", "@expert"), ("f", "@load{0.000}"),
                                                            ("P", "@prob{0.000}"), ("dead latents", "@dead")]))
        fig.select_one(TapTool).renderers = [bars]
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
        """Cell (i, j): mean over expert i's decoder rows of the best cosine with expert j's rows; the
        diagonal (rows of the same expert) is the baseline to compare with."""
        E = a.n_experts
        sim = a.similarity.tolist()
        cells = [(i, j) for i in range(E) for j in range(E)]
        self.heatmap_source = ColumnDataSource({
            "i": [i for i, _ in cells], "j": [j for _, j in cells], "sim": [sim[i][j] for i, j in cells],
            "x": [str(j) for _, j in cells], "y": [str(i) for i, _ in cells]})  # categorical axes want strings
        mapper = LinearColorMapper(palette=Viridis256, low=float(a.similarity.min()), high=float(a.similarity.max()))
        labels = [str(e) for e in range(E)]
        fig = figure(title="Inter-expert decoder similarity", height=380, width=420, x_range=labels,
                     y_range=list(reversed(labels)), x_axis_label="expert j", y_axis_label="expert i",
                     toolbar_location=None, tooltips=[("experts", "@i → @j"), ("mean max cosine", "@sim{0.000}")])
        fig.rect("x", "y", width=1, height=1, source=self.heatmap_source, line_color=None,
                 fill_color=transform("sim", mapper))
        fig.add_layout(ColorBar(color_mapper=mapper, width=10), "right")
        if E > 16:  # the axis labels would overlap
            fig.xaxis.major_label_text_font_size = fig.yaxis.major_label_text_font_size = "0pt"
        return fig

    def _experts_html(self) -> str:
        a = self.analysis
        colors = expert_colors(a.n_experts)
        rows = []
        for e in range(a.n_experts):
            tokens = ", ".join(f"{_visible(tok)}&nbsp;<small>({n:,})</small>" for tok, n in a.top_tokens[e])
            chosen = ' class="wb-expert-row wb-selected" style="outline:2px solid #333"' if e == self.expert \
                else ' class="wb-expert-row"'
            rows.append(f'<tr{chosen} data-expert="{e}"><td><span style="background:{colors[e]};padding:0 6px">'
                        f'{e}</span></td><td>{100 * float(a.expert_load[e]):.1f}%</td>'
                        f'<td>{float(a.mean_prob[e]):.3f}</td><td>{int(a.dead_per_expert[e])}/{a.expert_width}</td>'
                        f'<td>{tokens or "<i>no tokens</i>"}</td></tr>')
        return ('<table class="wb-experts"><thead><tr><th>expert</th><th>load f</th><th>mean p</th>'
                '<th>dead</th><th>most frequent tokens</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")

    def _duplicates_html(self, a: RouterAnalysis) -> str:
        n_latents = a.n_experts * a.expert_width
        summary = (f"<b>{a.n_duplicate_pairs:,}</b> pairs of latents in different experts have decoder cosine "
                   f"&gt; {a.dup_threshold:g}; <b>{a.n_duplicated_latents:,}</b> of {n_latents:,} latents "
                   f"({100 * a.n_duplicated_latents / n_latents:.1f}%) have such a twin.")
        if not a.duplicates:
            return f"<div class='wb-duplicates'>{summary}</div>"
        rows = "".join(
            f'<tr class="wb-dup" data-a="{x}" data-b="{y}"><td>{x} <small>(expert {x // a.expert_width})</small></td>'
            f'<td>{y} <small>(expert {y // a.expert_width})</small></td><td>{cos:.3f}</td></tr>'
            for x, y, cos in a.duplicates[:SHOWN_DUPLICATES])
        shown = min(len(a.duplicates), SHOWN_DUPLICATES)
        return (f"<div class='wb-duplicates'>{summary}<br>The {shown} most similar:<table><thead><tr><th>latent</th><th>twin</th>"
                f"<th>cosine</th></tr></thead><tbody>{rows}</tbody></table></div>")

    # ---------------------------------------------------------------------------------------------
    # Choosing an expert

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


def _message(text: str) -> str:
    return f'<div class="wb-message" style="color:#555;font-style:italic">{text}</div>'


def _visible(token: str) -> str:
    """A token with its whitespace made visible (a GPT-2 word's leading space, a newline)."""
    return html.escape(token).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"
