"""Live training curves in a notebook: hand ``TrainingDashboard().callback`` to ``Trainer.add_callback``.

    dashboard = TrainingDashboard()
    dashboard                              # display it in its own cell first
    trainer.add_callback(dashboard.callback)
    trainer.fit(stream)                    # in a later cell: the curves grow as rows are logged

Each history row redraws the plots it touches, and Panel sends them to the notebook at once:
outbound messages leave the kernel while a cell is still running, so in JupyterLab with a live
kernel the curves grow during the blocking ``fit``, not after it. The browser connects to the
dashboard once the cell that displays it has rendered its output, and a busy kernel hears of that
only after its current cell: run the dashboard's cell before the training cell (under Run All the
curves appear when ``fit`` returns). With no network, start the notebook with
``pn.extension(inline=True)`` so that the kernel serves Panel's JavaScript.

Each plot is a small SVG in an HTML pane, redrawn whole from the points received. Bokeh plots
updated in place (``ColumnDataSource.stream`` or ``patch``) do not survive Panel's notebook bridge:
it echoes every change back to the kernel, which applies the echoes on another thread while ``fit``
runs (dropping updates not yet sent: the plots froze), appends an echoed stream a second time, and
walks the whole plot graph for each echoed ``data`` change (a minute of busy kernel after a
40-step toy run). A whole SVG is one text property: an echo of it is cheap and harmless, and a
lost update is made good by the next.
"""
from __future__ import annotations

import html
import math
from numbers import Real
from typing import Any

import panel as pn

# Row keys that index a row rather than measure the SAE; lr is the schedule, not a result.
_NOT_PLOTTED = frozenset({"step", "sae", "tokens", "lr"})
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")
"""Curve colours, in the order curves join a plot (Category10)."""
MAX_DRAWN = 400
"""Points drawn per curve; a longer curve is drawn from evenly spaced points (and its last)."""


class TrainingDashboard(pn.viewable.Viewer):
    """One small plot per metric with a curve per SAE (each ``loss/<term>``, ``loss``, ``mse``,
    ``l0``, ``dead_fraction``, and every number an SAE reports, e.g. ``load_balance``), and for a
    metric that is a list, one plot per SAE with a curve per entry, labelled by the metric's first
    word (a Switch SAE's ``expert_load``: "expert 0", ...; a Matryoshka SAE's ``prefix_mse``:
    "prefix 0", ...). A metric or SAE seen for the first time gets its plot or curve then, so rows
    of any architecture (or a custom loss term) need no set-up.

    ``rows`` holds the received rows, ``points[(metric, sae)]`` the (steps, values) of each curve
    (list entries are metrics ``<name>/<i>``) and ``plots[title]`` the pane of each plot.
    """

    def __init__(self, plot_width: int = 340, plot_height: int = 200, **params: Any):
        super().__init__(**params)
        self.rows: list[dict[str, Any]] = []
        self.points: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self.plots: dict[str, pn.pane.HTML] = {}
        self._size = (plot_width, plot_height)
        self._curves: dict[str, list[tuple[str, str, str]]] = {}  # plot -> its (metric, SAE, label)s
        self._status = pn.pane.Markdown("Waiting for the first logged step...")
        self._grid = pn.FlexBox()
        self._layout = pn.Column(self._status, self._grid, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def callback(self, row: dict[str, Any]) -> None:
        """Add one ``Trainer`` history row to the plots (the function to pass to ``add_callback``)."""
        self.rows.append(row)
        step, sae = row["step"], row["sae"]
        touched: dict[str, None] = {}
        for key, value in row.items():
            if key in _NOT_PLOTTED:
                continue
            if isinstance(value, list):  # one curve per entry, named by the metric's first word:
                entry = key.split("_")[0]  # expert_load -> "expert 0", ..., prefix_mse -> "prefix 0", ...
                points = [(f"{key}/{i}", f"{key} · {sae}", f"{entry} {i}", v) for i, v in enumerate(value)]
            elif isinstance(value, Real):
                points = [(key, key, sae, value)]
            else:
                continue
            for metric, plot, label, v in points:
                if (metric, sae) not in self.points:
                    self.points[(metric, sae)] = ([], [])
                    self._curves.setdefault(plot, []).append((metric, sae, label))
                steps, values = self.points[(metric, sae)]
                steps.append(step)
                values.append(float(v))
                touched[plot] = None
        new_panes = []
        for plot in touched:
            curves = [(label, *self.points[(metric, sae_)]) for metric, sae_, label in self._curves[plot]]
            svg = curves_svg(plot, curves, *self._size)
            if plot in self.plots:
                self.plots[plot].object = svg
            else:
                self.plots[plot] = pn.pane.HTML(svg, margin=(0, 4))
                new_panes.append(self.plots[plot])
        if new_panes:
            self._grid.extend(new_panes)
        self._status.object = f"**step {step:,}** · {row['tokens']:,} tokens · last row from `{sae}`"


def curves_svg(title: str, curves: list[tuple[str, list[int], list[float]]], width: int, height: int) -> str:
    """A line plot of ``curves`` (label, steps, values) as inline SVG: the step and value ranges
    at the axes, a legend, each curve's label and last point on hover. Every curve is a
    ``<polyline class="wb-curve" data-label=..>`` with one vertex per point drawn."""
    left, right, top, bottom = 52, 8, 20, 18
    steps = [s for _, xs, _ in curves for s in xs]
    values = [v for _, _, ys in curves for v in ys if math.isfinite(v)]
    x_lo, x_hi = _span(min(steps), max(steps))
    y_lo, y_hi = _span(min(values, default=0.0), max(values, default=1.0))
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(s: float) -> float:
        return left + plot_w * (s - x_lo) / (x_hi - x_lo)

    def y(v: float) -> float:
        return top + plot_h * (y_hi - v) / (y_hi - y_lo)

    parts = [f'<svg class="wb-plot" data-title="{html.escape(title)}" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">',
             f'<text x="{left}" y="13" font-size="12" font-weight="bold">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#bbb"/>',
             f'<text x="{left - 3}" y="{top + 8}" text-anchor="end">{y_hi:.3g}</text>',
             f'<text x="{left - 3}" y="{top + plot_h}" text-anchor="end">{y_lo:.3g}</text>',
             f'<text x="{left}" y="{height - 4}">{x_lo:,.0f}</text>',
             f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end">step {x_hi:,.0f}</text>']
    for i, (label, xs, ys) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        drawn = _thinned(len(xs))
        vertices = " ".join(f"{x(xs[j]):.1f},{y(ys[j]):.1f}" for j in drawn if math.isfinite(ys[j]))
        name = html.escape(label)
        parts.append(f'<polyline class="wb-curve" data-label="{name}" points="{vertices}" fill="none" '
                     f'stroke="{color}" stroke-width="1.5"><title>{name}</title></polyline>')
        if math.isfinite(ys[-1]):
            parts.append(f'<circle cx="{x(xs[-1]):.1f}" cy="{y(ys[-1]):.1f}" r="2.5" fill="{color}">'
                         f'<title>{name}: {ys[-1]:.4g} at step {xs[-1]:,}</title></circle>')
        parts.append(f'<text x="{left + plot_w - 4}" y="{top + 11 + 11 * i}" text-anchor="end" fill="{color}">'
                     f'{name}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _span(lo: float, hi: float) -> tuple[float, float]:
    """An axis range holding [lo, hi], widened when it is a single value."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _thinned(n: int) -> list[int]:
    """Indices of at most MAX_DRAWN + 1 evenly spaced points out of n, the last always among them."""
    stride = math.ceil(n / MAX_DRAWN)
    return list(range(0, n - 1, stride)) + [n - 1]
