"""Live training curves in a notebook, drawn while a background run trains.

    dashboard = TrainingDashboard()
    dashboard                              # display it (its own cell, or above the next)
    run = trainer.start(stream)            # training in a background thread: returns at once
    dashboard.attach(run)                  # draws the run's rows; its Stop button calls run.stop()
    history = await run                    # a later cell: waits and leaves the kernel free

``trainer.fit(stream)`` after ``dashboard.attach(trainer)`` (or ``trainer.add_callback(dashboard.callback)``)
still works and draws each row as it is logged, but a blocking ``fit`` keeps the kernel busy: the
browser connects to the dashboard by a message that the kernel reads only between cells, so under
Run All nothing is drawn until ``fit`` returns. With ``trainer.start`` the kernel is free as soon
as the cell returns; ``await run`` waits for the run without blocking it (Jupyter's kernel reads the
dashboard's messages while an awaiting cell runs), so Run All draws live too. ``run.wait()`` waits
blocking: the curves keep growing in a connected notebook (the dashboard draws from the waiting
thread), but the Stop button and a not-yet-connected dashboard wait for the cell to end.

The training thread never touches Panel: the trainer's callback only queues the row, and the
notebook's own thread draws the queue (scheduled on its event loop, at most every
``MIN_REDRAW_SECONDS``; from ``run.wait()`` every poll; or when a test calls :meth:`refresh`).

Each plot is a small SVG in an HTML pane, redrawn whole from the points received. Bokeh plots
updated in place (``ColumnDataSource.stream`` or ``patch``) do not survive Panel's notebook bridge:
it echoes every change back to the kernel, appends an echoed stream a second time, and walks the
whole plot graph for each echoed ``data`` change (a minute of busy kernel after a 40-step toy run).
A whole SVG is one text property: an echo of it is cheap and harmless, and a lost update is made
good by the next. With no network, start the notebook with ``pn.extension(inline=True)`` so that
the kernel serves Panel's JavaScript.
"""
from __future__ import annotations

import asyncio
import collections
import html
import math
import threading
import time
from numbers import Real
from typing import Any

import panel as pn

from ..train.trainer import Trainer, TrainingRun

# Row keys that index a row rather than measure the SAE; lr is the schedule, not a result.
_NOT_PLOTTED = frozenset({"step", "sae", "tokens", "lr"})
# Metrics that mean what their name says only once the trainer's dead window has filled: before,
# the trainer counts the latents that have not fired since the start of the run.
_WINDOWED = frozenset({"dead_fraction"})
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
          "#bcbd22", "#17becf")
"""Curve colours, in the order curves join a plot (Category10)."""
DASHES = ("", "7 3", "2 2", "9 3 2 3", "4 4", "1 3", "12 3 3 3 3 3")
"""Curve dash patterns (SVG ``stroke-dasharray``), in the same order: with 7 patterns and 10
colours, no two of a plot's first 70 curves look alike, and curves with equal values stay apart."""
MARKERS = ("circle", "square", "triangle", "diamond", "triangle-down", "plus", "cross")
"""Curve markers, in the same order; each curve marks a few points, staggered between curves."""
MAX_DRAWN = 400
"""Points drawn per curve; a longer curve is drawn from evenly spaced points (and its last)."""
MARKS_PER_CURVE = 6
"""Markers per curve, besides the one on its newest point."""
MIN_REDRAW_SECONDS = 0.3
"""Rows from a background run are drawn at most this often."""


class TrainingDashboard(pn.viewable.Viewer):
    """One small plot per metric with a curve per SAE (each ``loss/<term>``, ``loss``, ``mse``,
    ``l0``, ``dead_fraction``, and every number an SAE reports, e.g. ``load_balance``), and for a
    metric that is a list, one plot per SAE with a curve per entry, labelled by the metric's first
    word (a Switch SAE's ``expert_load``: "expert 0", ...; a Matryoshka SAE's ``prefix_mse``:
    "prefix 0", ...). A metric or SAE seen for the first time gets its plot or curve then, so rows
    of any architecture (or a custom loss term) need no set-up.

    Each curve has its own colour, dash pattern and marker (the legend, under the plot, shows all
    three); loss-like metrics (``loss``, ``loss/<term>``, ``mse``, ``fvu``, ``*_mse``) are drawn
    on a log axis while all their values are positive. Once attached to a run or trainer, the
    x axis spans the whole run and ``dead_fraction`` is drawn from the step at which the trainer's
    dead window (``TrainConfig.dead_window_tokens``) had filled; until then the status line says how
    full it is.

    ``run`` (optional) is a :class:`~workbench.train.TrainingRun` to :meth:`attach`. ``rows`` holds
    the received rows, ``points[(metric, sae)]`` the (steps, values) of each curve (list entries are
    metrics ``<name>/<i>``), ``plots[title]`` the pane of each plot, ``status`` the line above them
    and ``stop_button`` the button that stops the attached run.
    """

    def __init__(self, run: TrainingRun | None = None, *, plot_width: int = 420, plot_height: int = 230,
                 **params: Any):
        super().__init__(**params)
        self.rows: list[dict[str, Any]] = []
        self.points: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
        self.plots: dict[str, pn.pane.HTML] = {}
        self._size = (plot_width, plot_height)
        self._curves: dict[str, list[tuple[str, str, str]]] = {}  # plot -> its (metric, SAE, label)s
        self._plot_metric: dict[str, str] = {}  # plot -> the row key it draws
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._received: set[int] = set()  # ids of the rows received (kept alive in self.rows)
        self._owner = threading.get_ident()
        self._loop = _running_loop()
        self._schedule_lock = threading.Lock()
        self._scheduled = False
        self._last_drawn = 0.0
        self._run: TrainingRun | None = None
        self._trainer: Trainer | None = None
        self._window: int | None = None
        self._window_full_at: dict[str, int] = {}  # SAE -> first logged step with a full dead window
        self._stopping = False

        self.status = pn.pane.Markdown("Waiting for the first logged step...", margin=(4, 10))
        self.stop_button = pn.widgets.Button(label="Stop training", color="danger", width=120,
                                             disabled=True, visible=False, margin=(8, 10))
        self.stop_button.on_click(self._on_stop)
        self._grid = pn.FlexBox()
        self._layout = pn.Column(pn.Row(self.stop_button, self.status), self._grid, sizing_mode="stretch_width")
        if run is not None:
            self.attach(run)

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    # ---------------------------------------------------------------------------------------------
    # Receiving rows

    def attach(self, source: TrainingRun | Trainer) -> None:
        """Draw the rows of a started run (``trainer.start``), or of a trainer's ``fit``: the rows
        logged so far at once, the others as they are logged. With a run, the Stop button calls
        its ``stop()`` and the status line says how it ended. Call it from the notebook's thread."""
        if isinstance(source, TrainingRun):
            run, trainer = source, source.trainer
        elif isinstance(source, Trainer):
            run, trainer = None, source
        else:
            raise TypeError(f"attach takes a TrainingRun (trainer.start(...)) or a Trainer, not a "
                            f"{type(source).__name__}")
        self._owner = threading.get_ident()
        self._loop = _running_loop() or self._loop
        self._trainer = trainer
        self._window = trainer.cfg.dead_window_tokens
        trainer.add_callback(self.callback)  # once, however often it is attached
        for row in list(trainer.history):  # those logged before; any received twice are dropped
            self._pending.append(row)
        if run is not None:
            self._run, self._stopping = run, False
            self.stop_button.visible = True
            self.stop_button.disabled = not run.running
            run.watch(self._on_wait)
            run.add_done_callback(lambda _run: self._schedule())
        self.refresh()

    def callback(self, row: dict[str, Any]) -> None:
        """Receive one ``Trainer`` history row (the function ``attach`` hands to ``add_callback``).
        In the dashboard's own thread it is drawn at once; from a training thread it is queued and
        drawn by the notebook's thread."""
        self._pending.append(row)
        if threading.get_ident() == self._owner:
            self.refresh()
        else:
            self._schedule()

    def refresh(self) -> None:
        """Draw the queued rows and update the status line. From another thread than the
        dashboard's it only schedules that (drawing is the dashboard's thread's job)."""
        if threading.get_ident() != self._owner:
            self._schedule()
            return
        self._last_drawn = time.monotonic()
        touched: dict[str, None] = {}
        while self._pending:
            row = self._pending.popleft()
            if id(row) not in self._received:
                self._received.add(id(row))
                self._add(row, touched)
        new_panes = []
        for plot in touched:
            svg = self._svg(plot)
            if svg is None:  # nothing meaningful to draw yet
                continue
            if plot in self.plots:
                self.plots[plot].object = svg
            else:
                self.plots[plot] = pn.pane.HTML(svg, margin=(0, 4))
                new_panes.append(self.plots[plot])
        if new_panes:
            self._grid.extend(new_panes)
        self._update_status()

    def _add(self, row: dict[str, Any], touched: dict[str, None]) -> None:
        self.rows.append(row)
        step, sae = row["step"], row["sae"]
        if self._window is not None and row.get("tokens", 0) >= self._window:
            self._window_full_at.setdefault(sae, step)
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
                    self._plot_metric.setdefault(plot, key)
                steps, values = self.points[(metric, sae)]
                steps.append(step)
                values.append(float(v))
                touched[plot] = None

    def _drawn_points(self, metric: str, sae: str) -> tuple[list[int], list[float]]:
        """A curve's points worth drawing: a windowed metric's from the step its window was full."""
        steps, values = self.points[(metric, sae)]
        if metric.split("/")[0] not in _WINDOWED or self._window is None:
            return steps, values
        if sae not in self._window_full_at:
            return [], []
        first = self._window_full_at[sae]
        keep = [i for i, s in enumerate(steps) if s >= first]
        return [steps[i] for i in keep], [values[i] for i in keep]

    def _svg(self, plot: str) -> str | None:
        curves = [(label, *self._drawn_points(metric, sae)) for metric, sae, label in self._curves[plot]]
        curves = [c for c in curves if c[1]]
        if not curves:
            return None
        key = self._plot_metric[plot]
        values = [v for _, _, ys in curves for v in ys if math.isfinite(v)]
        log_y = _loss_like(key) and bool(values) and min(values) > 0
        total = self._trainer.cfg.total_steps if self._trainer is not None else None
        return curves_svg(plot, curves, *self._size, log_y=log_y, y_title=key, x_max=total)

    # ---------------------------------------------------------------------------------------------
    # The notebook's thread

    def _schedule(self) -> None:
        """Have the dashboard's thread draw the queue soon (thread-safe; one pending draw at most)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # no event loop to draw on: the next refresh (or run.wait()) draws the queue
        with self._schedule_lock:
            if self._scheduled:
                return
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._scheduled_refresh)
        except RuntimeError:  # the loop closed meanwhile
            self._scheduled = False

    def _scheduled_refresh(self) -> None:
        wait = MIN_REDRAW_SECONDS - (time.monotonic() - self._last_drawn)
        if wait > 0 and self._loop is not None:
            self._loop.call_later(wait, self._scheduled_refresh)
            return
        with self._schedule_lock:
            self._scheduled = False
        self.refresh()

    def _on_wait(self, run: TrainingRun) -> None:
        """Called by ``run.wait()`` from the thread waiting on the run."""
        if threading.get_ident() == self._owner and run is self._run:
            self.refresh()

    def _on_stop(self, _event: Any = None) -> None:
        run = self._run
        if run is not None and run.running:
            run.stop()
            self._stopping = True
            self.stop_button.disabled = True
        self._update_status()

    def _update_status(self) -> None:
        parts = []
        if self.rows:
            last = self.rows[-1]
            total = f" of {self._trainer.cfg.total_steps:,}" if self._trainer is not None else ""
            parts.append(f"**step {last['step']:,}{total}** · {last.get('tokens', 0):,} tokens")
        else:
            parts.append("Waiting for the first logged step...")
        run = self._run
        if run is not None:
            if run.running:
                parts.append("stopping at the next step..." if self._stopping else "training")
            elif run.error is not None:
                parts.append(f"**failed**: {type(run.error).__name__}: {html.escape(str(run.error))}")
            elif run.stopped:
                where = " (checkpointed: `Trainer.resume` continues it)" if run.trainer.run_dir is not None else ""
                parts.append(f"**stopped** at step {run.step:,}{where}")
            else:
                parts.append("**finished**")
            if not run.running:
                self.stop_button.disabled = True
        note = self._window_note()
        if note:
            parts.append(note)
        self.status.object = " · ".join(parts)

    def _window_note(self) -> str | None:
        """What the status line says about a windowed metric still hidden."""
        window = self._window
        tokens = self.rows[-1].get("tokens", 0) if self.rows else 0
        hidden = sorted({metric for metric, _ in self.points if metric in _WINDOWED})
        if window is None or not hidden or tokens >= window:
            return None
        return (f"{', '.join(hidden)}: window {window:,} tokens, filled at {100 * tokens / window:.3g}%; "
                f"drawn once it is full")


# -------------------------------------------------------------------------------------------------
# Drawing

def curves_svg(title: str, curves: list[tuple[str, list[int], list[float]]], width: int, height: int, *,
               log_y: bool = False, y_title: str | None = None, x_max: int | None = None) -> str:
    """A line plot of ``curves`` (label, steps, values) as inline SVG: gridlines at a few round
    ticks on both axes, axis titles ("step" and ``y_title``, marked "log" when ``log_y``), and the
    legend under the plot area. Curve i has colour ``COLORS[i]``, dash ``DASHES[i]`` and marker
    ``MARKERS[i]`` (cycling), and shows its label and newest value on hover. ``x_max`` extends the
    x axis (e.g. to the run's last step). Every curve is a ``<polyline class="wb-curve"
    data-label=..>`` with one vertex per point drawn; the plot area is ``<rect class="wb-area">``,
    the legend ``<g class="wb-legend" transform="translate(x,y)">``."""
    left, right, top = 58, 12, 22
    axis_h = 30  # tick labels and the x title under the plot area
    plot_w = width - left - right
    plot_h = height - top - axis_h
    legend_rows, legend_cols, col_w = _legend_grid([label for label, _, _ in curves], plot_w)
    total_h = height + 14 * legend_rows + 6

    steps = [s for _, xs, _ in curves for s in xs]
    x_lo, x_hi, x_ticks = _linear_axis(0.0, float(max(max(steps), x_max or 0, 1)), ticks=5, floor_zero=True)
    values = [v for _, _, ys in curves for v in ys if math.isfinite(v) and (v > 0 or not log_y)]
    if log_y:
        y_lo, y_hi, y_ticks = _log_axis(min(values), max(values))
    else:
        y_lo, y_hi, y_ticks = _linear_axis(min(values, default=0.0), max(values, default=1.0), ticks=4,
                                           floor_zero=min(values, default=0.0) >= 0)
    y_labels = _tick_labels(y_ticks)
    to_axis = math.log10 if log_y else float

    def x(s: float) -> float:
        return left + plot_w * (s - x_lo) / (x_hi - x_lo)

    def y(v: float) -> float:
        return top + plot_h * (y_hi - to_axis(v)) / (y_hi - y_lo)

    def drawable(v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not log_y)

    name = html.escape(title)
    parts = [f'<svg class="wb-plot" data-title="{name}" data-y-scale="{"log" if log_y else "linear"}" '
             f'width="{width}" height="{total_h}" font-family="sans-serif" font-size="10">',
             f'<text x="{left}" y="14" font-size="12" font-weight="bold">{name}</text>']
    for t in x_ticks:
        parts.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>'
                     f'<text class="wb-xtick" x="{x(t):.1f}" y="{top + plot_h + 11}" text-anchor="middle">'
                     f'{_fmt_step(t)}</text>')
    for t, tick_label in zip(y_ticks, y_labels):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#eee"/>'
                     f'<text class="wb-ytick" x="{left - 4}" y="{y(t) + 3:.1f}" text-anchor="end">{tick_label}</text>')
    parts.append(f'<rect class="wb-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
                 f'stroke="#bbb"/>')
    parts.append(f'<text class="wb-xtitle" x="{left + plot_w / 2:.1f}" y="{top + plot_h + 25}" '
                 f'text-anchor="middle">step</text>')
    y_name = html.escape(y_title or title) + (" (log)" if log_y else "")
    parts.append(f'<text class="wb-ytitle" transform="translate(12,{top + plot_h / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{y_name}</text>')

    n = len(curves)
    for i, (label, xs, ys) in enumerate(curves):
        color, dash, marker = _style(i)
        drawn = [j for j in _thinned(len(xs)) if drawable(ys[j])]
        vertices = " ".join(f"{x(xs[j]):.1f},{y(ys[j]):.1f}" for j in drawn)
        esc = html.escape(label)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline class="wb-curve" data-label="{esc}" points="{vertices}" fill="none" '
                     f'stroke="{color}" stroke-width="1.6"{dash_attr}><title>{esc}</title></polyline>')
        # A few markers, staggered so that curves with equal values show each one's markers: with
        # at least n points per marker, no two curves mark the same point.
        if len(drawn) > 1:
            n_marks = max(1, min(MARKS_PER_CURVE, len(drawn) // n))
            spacing = len(drawn) / n_marks
            marks = sorted({drawn[min(len(drawn) - 1, int((k + (i + 0.5) / n) * spacing))]
                            for k in range(n_marks)} - {drawn[-1]})
            parts.extend(_marker(marker, x(xs[j]), y(ys[j]), 3.0, color, "wb-marker", step=xs[j]) for j in marks)
        if drawable(ys[-1]):
            parts.append(_marker(marker, x(xs[-1]), y(ys[-1]), 3.6, color, "wb-last",
                                 f"{esc}: {ys[-1]:.4g} at step {xs[-1]:,}"))

    legend_y = top + plot_h + axis_h + 4
    parts.append(f'<g class="wb-legend" transform="translate({left},{legend_y})">')
    for i, (label, _, _) in enumerate(curves):
        color, dash, marker = _style(i)
        gx, gy = (i % legend_cols) * col_w, (i // legend_cols) * 14
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        shown = label if len(label) <= _LEGEND_CHARS else label[:_LEGEND_CHARS - 1] + "…"
        parts.append(f'<g class="wb-legend-entry" data-label="{html.escape(label)}">'
                     f'<line x1="{gx}" x2="{gx + 24}" y1="{gy + 6}" y2="{gy + 6}" stroke="{color}" '
                     f'stroke-width="1.6"{dash_attr}/>{_marker(marker, gx + 12, gy + 6, 3.0, color)}'
                     f'<text x="{gx + 29}" y="{gy + 10}">{html.escape(shown)}</text>'
                     f'<title>{html.escape(label)}</title></g>')
    parts.append("</g></svg>")
    return "".join(parts)


_LEGEND_CHARS = 24  # longer labels are cut in the legend (the whole label is its hover text)


def _legend_grid(labels: list[str], width: float) -> tuple[int, int, float]:
    """(rows, columns, column width in pixels) of a legend of ``labels`` in ``width`` pixels."""
    chars = max((min(len(label), _LEGEND_CHARS) for label in labels), default=1)
    col_w = 36 + 6.2 * chars
    cols = max(1, min(len(labels), int(width // col_w)))
    return math.ceil(len(labels) / cols), cols, col_w


def _style(i: int) -> tuple[str, str, str]:
    return COLORS[i % len(COLORS)], DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]


def _marker(kind: str, cx: float, cy: float, r: float, color: str, cls: str = "wb-legend-marker",
            title: str | None = None, step: int | None = None) -> str:
    tip = f"<title>{title}</title>" if title else ""
    at = f' data-step="{step}"' if step is not None else ""
    filled = f'class="{cls}"{at} fill="{color}" stroke="white" stroke-width="0.6"'
    if kind == "circle":
        return f'<circle {filled} cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}">{tip}</circle>'
    if kind == "square":
        s = 0.85 * r
        return f'<rect {filled} x="{cx - s:.1f}" y="{cy - s:.1f}" width="{2 * s:.1f}" height="{2 * s:.1f}">{tip}</rect>'
    shapes = {
        "triangle": [(0, -1.15), (1.05, 0.8), (-1.05, 0.8)],
        "triangle-down": [(0, 1.15), (1.05, -0.8), (-1.05, -0.8)],
        "diamond": [(0, -1.25), (1.0, 0), (0, 1.25), (-1.0, 0)],
    }
    if kind in shapes:
        d = "M" + " L".join(f"{cx + r * dx:.1f},{cy + r * dy:.1f}" for dx, dy in shapes[kind]) + " Z"
        return f'<path {filled} d="{d}">{tip}</path>'
    if kind == "plus":
        d = f"M{cx - r:.1f},{cy:.1f} H{cx + r:.1f} M{cx:.1f},{cy - r:.1f} V{cy + r:.1f}"
    else:  # cross
        s = 0.8 * r
        d = f"M{cx - s:.1f},{cy - s:.1f} L{cx + s:.1f},{cy + s:.1f} M{cx - s:.1f},{cy + s:.1f} L{cx + s:.1f},{cy - s:.1f}"
    return f'<path class="{cls}"{at} d="{d}" stroke="{color}" stroke-width="1.8" fill="none">{tip}</path>'


def _loss_like(key: str) -> bool:
    """Whether a metric is a loss or an error, drawn on a log axis (``loss``, ``loss/<term>``,
    ``mse``, ``fvu``, ``prefix_mse``, ...)."""
    last = key.split("/")[-1].split("_")[-1]
    return key == "loss" or key.startswith("loss/") or last in ("mse", "fvu", "loss")


def _linear_axis(lo: float, hi: float, ticks: int, floor_zero: bool) -> tuple[float, float, list[float]]:
    """(low, high, ticks) of a linear axis holding [lo, hi] with about ``ticks`` round ticks;
    ``floor_zero`` keeps it from going below 0 (data that cannot be negative)."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    if floor_zero:
        lo = max(lo, 0.0)
    step = _nice_step((hi - lo) / ticks)
    low, high = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return low, high, [low + k * step for k in range(round((high - low) / step) + 1)]


def _log_axis(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """(log10 low, log10 high, ticks) of a log axis holding [lo, hi] > 0 and ending at ticks: at
    1-2-3-5 (or 1-2-5, 1-3, decades) times powers of ten when it spans about a decade or more,
    else at about five round values."""
    if not hi > lo * (1 + 1e-9):
        lo, hi = lo / 1.2, hi * 1.2
    a, b = math.log10(lo), math.log10(hi)
    if b - a >= 0.9:
        decades = range(math.floor(a) - 1, math.ceil(b) + 2)
        for multiples in ((1, 2, 3, 5), (1, 2, 5), (1, 3), (1,)):
            candidates = sorted(m * 10.0 ** e for e in decades for m in multiples)
            low = max(t for t in candidates if t <= lo * (1 + 1e-9))
            high = min(t for t in candidates if t >= hi * (1 - 1e-9))
            ticks = [t for t in candidates if low <= t <= high]
            if len(ticks) <= 7:
                break
        ticks = ticks[::math.ceil(len(ticks) / 7)]
    else:
        step = _nice_step((hi - lo) / 4)
        low, high = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
        if low <= 0:  # the round value under lo is 0: start at lo, with ticks from the first above
            low = lo
        first = math.ceil(low / step - 1e-9) * step
        ticks = [first + k * step for k in range(round((high - first) / step) + 1)]
    return math.log10(low), math.log10(high), ticks


def _nice_step(raw: float) -> float:
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _tick_labels(ticks: list[float]) -> list[str]:
    """The shortest labels (3 significant digits or more) that say each tick's value exactly."""
    scale = max(map(abs, ticks), default=1.0) or 1.0
    for digits in range(3, 10):
        labels = ["0" if abs(t) < 1e-12 * scale else f"{t:.{digits}g}" for t in ticks]
        if all(abs(float(label) - t) <= 1e-9 * scale for label, t in zip(labels, ticks)):
            return labels
    return labels


def _fmt_step(v: float) -> str:
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= size:
            return f"{v / size:.3g}{suffix}"
    return f"{v:.0f}"


def _thinned(n: int) -> list[int]:
    """Indices of at most MAX_DRAWN + 1 evenly spaced points out of n, the last always among them."""
    stride = math.ceil(n / MAX_DRAWN)
    return list(range(0, n - 1, stride)) + [n - 1]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """This thread's running event loop (a Jupyter kernel's, a Panel server's), if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
