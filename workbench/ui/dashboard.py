"""Live training curves in a notebook: hand ``TrainingDashboard().callback`` to ``Trainer.add_callback``.

    dashboard = TrainingDashboard()
    dashboard                              # display it in its own cell first
    trainer.add_callback(dashboard.callback)
    trainer.fit(stream)                    # in a later cell: the curves grow as rows are logged

Each history row updates one Bokeh ``ColumnDataSource`` per (metric, SAE), and the dashboard pushes
the change to the notebook at once. Outbound messages leave the kernel while a cell is still
running, so in JupyterLab with a live kernel the curves grow during the blocking ``fit``, not after
it. The browser connects to the dashboard when the cell that displays it has rendered its output,
and a busy kernel only hears of that after its current cell: run the dashboard's cell on its own
before the training cell (under Run All the curves appear when ``fit`` returns). With no network,
start the notebook with ``pn.extension(inline=True)`` so that the kernel serves Bokeh's JavaScript.

Panel's notebook bridge echoes every change back to the kernel, late (the kernel reads the echoes
once it is idle), which shapes three choices here: each update replaces a source's columns with
all the points received so far (kept apart from the source), which is safe to apply twice and
whatever the echoes did meanwhile, rather than streaming a point (an echoed stream appends it
again); a plot that gains a curve is redrawn rather than given a new renderer; and curves are
drawn as segments between consecutive points, not as a ``Line`` glyph, whose echoed colour fails
Bokeh's validation (bokeh#14364).
"""
from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
import panel as pn
from bokeh.models import ColumnDataSource
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

# Row keys that index a row rather than measure the SAE; lr is the schedule, not a result.
_NOT_PLOTTED = frozenset({"step", "sae", "tokens", "lr"})


class TrainingDashboard(pn.viewable.Viewer):
    """One small plot per metric with a curve per SAE (each ``loss/<term>``, ``loss``, ``mse``,
    ``l0``, ``dead_fraction``, ``load_balance``), and one expert-load plot per Switch SAE with a
    curve per expert. A metric or SAE seen for the first time gets its plot or curve then, so rows
    of any architecture (or a custom loss term) need no set-up.

    ``rows`` holds the received rows; ``sources[(metric, sae)]`` the plotted points, as columns
    ``step`` and ``value`` (expert loads are metrics ``expert_load/<e>``); ``figures[plot]`` the
    Bokeh figure of each plot.
    """

    def __init__(self, plot_width: int = 340, plot_height: int = 220, **params: Any):
        super().__init__(**params)
        self.rows: list[dict[str, Any]] = []
        self.sources: dict[tuple[str, str], ColumnDataSource] = {}
        self._size = (plot_width, plot_height)
        # The points as received: the sources are rebuilt from these, never from their own columns,
        # which a late echo from the notebook may have set back to an earlier state.
        self._points: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self._curves: dict[str, list[tuple[ColumnDataSource, str]]] = {}  # plot -> its (source, label)s
        self._panes: dict[str, pn.pane.Bokeh] = {}
        self._status = pn.pane.Markdown("Waiting for the first logged step...")
        self._plots = pn.FlexBox()
        self._layout = pn.Column(self._status, self._plots, sizing_mode="stretch_width")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    @property
    def figures(self) -> dict[str, figure]:
        return {plot: pane.object for plot, pane in self._panes.items()}

    def callback(self, row: dict[str, Any]) -> None:
        """Add one ``Trainer`` history row to the plots (the function to pass to ``add_callback``)."""
        self.rows.append(row)
        step, sae = row["step"], row["sae"]
        grown: list[str] = []
        for key, value in row.items():
            if key in _NOT_PLOTTED:
                continue
            if isinstance(value, list):  # a Switch SAE's per-expert load: one curve per expert
                points = [(f"{key}/{e}", f"{key} · {sae}", f"expert {e}", v) for e, v in enumerate(value)]
            elif isinstance(value, Real):
                points = [(key, key, sae, value)]
            else:
                continue
            for metric, plot, label, v in points:
                source = self.sources.get((metric, sae))
                if source is None:
                    source = self.sources[(metric, sae)] = ColumnDataSource(
                        {"step": [], "value": [], "prev_step": [], "prev_value": []})
                    self._points[(metric, sae)] = ([], [])
                    self._curves.setdefault(plot, []).append((source, label))
                    grown.append(plot)
                steps, values = self._points[(metric, sae)]
                steps.append(step)
                values.append(v)
                # Each point also holds the one before it: the curve is drawn as segments between them.
                source.data = {"step": np.array(steps), "value": np.array(values, dtype=np.float64),
                               "prev_step": np.array(steps[:1] + steps[:-1]),
                               "prev_value": np.array(values[:1] + values[:-1], dtype=np.float64)}
        for plot in dict.fromkeys(grown):
            self._draw(plot)
        self._status.object = f"**step {step:,}** · {row['tokens']:,} tokens · last row from `{sae}`"
        # Direct Bokeh changes reach a notebook only when pushed; in a script this does nothing.
        pn.io.push_notebook(self._layout)

    def _draw(self, plot: str) -> None:
        """(Re)draw ``plot`` with all its curves, replacing the figure it had."""
        width, height = self._size
        fig = figure(title=plot, width=width, height=height, x_axis_label="step",
                     tools="pan,wheel_zoom,box_zoom,reset,hover", toolbar_location="above")
        for i, (source, label) in enumerate(self._curves[plot]):
            color = Category10_10[i % len(Category10_10)]
            fig.segment("prev_step", "prev_value", "step", "value", source=source, color=color, line_width=2,
                        legend_label=label)
            fig.scatter("step", "value", source=source, color=color, size=4)
        fig.legend.location = "top_right"
        fig.legend.label_text_font_size = "8pt"
        if plot in self._panes:
            self._panes[plot].object = fig
        else:
            self._panes[plot] = pn.pane.Bokeh(fig)
            self._plots.append(self._panes[plot])
