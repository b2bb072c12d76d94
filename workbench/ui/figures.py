"""Static figures for the notebooks (matplotlib): frontiers, training curves, heatmaps, bars.

Each function returns a closed ``matplotlib.figure.Figure``, so a notebook cell that ends with the
call shows it exactly once, and a script can ``fig.savefig(path)``. Pass ``ax=`` to draw into a panel
of a larger figure instead (the function then returns that axes' figure).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from .style import expert_colors

Results = Mapping[str, Mapping[str, Any]]
"""{name: {metric: value}}, as ``workbench.run.run`` returns and metrics.json holds."""


def _axes(ax: Axes | None, size: tuple[float, float] = (5.0, 3.6)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    plt.close(fig)
    return fig, ax


def frontier(results: Results, x: str, y: str, group: Callable[[str], str] | Mapping[str, str], *,
             logx: bool = False, logy: bool = False, ax: Axes | None = None, title: str | None = None,
             xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """One line per group through its runs' (x, y) points, sorted by x: e.g. MSE against L0 for a k
    sweep of each architecture. ``group`` maps a run name to its group (a dict or a function)."""
    fig, ax = _axes(ax)
    group_of = group if callable(group) else group.__getitem__
    groups: dict[str, list[tuple[float, float]]] = {}
    for name, metrics in results.items():
        groups.setdefault(group_of(name), []).append((float(metrics[x]), float(metrics[y])))
    for label, points in groups.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    _finish(ax, xlabel or x, ylabel or y, title, logx, logy, legend=len(groups) > 1)
    return fig


def curves(history: Mapping[str, Sequence[Mapping[str, Any]]], y: str, x: str = "step", *,
           x_scale: Mapping[str, float] | None = None, logx: bool = False, logy: bool = False,
           ax: Axes | None = None, title: str | None = None, xlabel: str | None = None,
           ylabel: str | None = None) -> Figure:
    """Training curves, one line per SAE, from ``workbench.run.read_history``. ``x_scale`` multiplies
    each SAE's x (e.g. steps into training FLOPs)."""
    fig, ax = _axes(ax)
    for name, rows in history.items():
        scale = (x_scale or {}).get(name, 1.0)
        ax.plot([row[x] * scale for row in rows], [row[y] for row in rows], label=name)
    _finish(ax, xlabel or x, ylabel or y, title, logx, logy, legend=len(history) > 1)
    return fig


def heatmap(matrix: np.ndarray, *, row_labels: Sequence[Any] | None = None,
            col_labels: Sequence[Any] | None = None, ax: Axes | None = None, title: str | None = None,
            xlabel: str | None = None, ylabel: str | None = None, vmin: float | None = None,
            vmax: float | None = None, cmap: str = "viridis", annotate: str | None = None,
            colorbar_label: str | None = None) -> Figure:
    """A matrix as colours with a colour bar titled ``colorbar_label``; ``annotate`` (a format such as
    "{:.2f}") writes each value. Pass ``vmin`` and ``vmax`` for a fixed scale (e.g. 0 and 1 for the
    router's inter-expert decoder cosines, as the router inspector draws them), else the colours
    stretch over the matrix' own range."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = _axes(ax, (4.6, 3.8))
    image = ax.imshow(matrix, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    colorbar = fig.colorbar(image, ax=ax)
    if colorbar_label:
        colorbar.set_label(colorbar_label)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), [str(v) for v in row_labels])
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), [str(v) for v in col_labels])
    if annotate:
        mid = np.nanmean(matrix)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, annotate.format(value), ha="center", va="center", fontsize=8,
                    color="black" if value > mid else "white")
    _finish(ax, xlabel, ylabel, title, False, False, legend=False)
    return fig


def bars(values: Mapping[str, float], *, reference: float | None = None, ax: Axes | None = None,
         title: str | None = None, ylabel: str | None = None, colors: Sequence[str] | str | None = None) -> Figure:
    """One bar per name; ``reference`` draws a dashed horizontal line (e.g. uniform expert load);
    ``colors`` one colour per bar, or "experts" for the router inspector's expert colours (bar i in
    expert i's)."""
    fig, ax = _axes(ax)
    names = list(values)
    if colors == "experts":
        colors = expert_colors(len(names))
    ax.bar(range(len(names)), [values[n] for n in names], color=colors, edgecolor="#555" if colors else None)
    slanted = len(names) > 8 or sum(len(str(n)) for n in names) > 48  # labels that would run into each other
    ax.set_xticks(range(len(names)), names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="gray")
    _finish(ax, None, ylabel, title, False, False, legend=False)
    return fig


def scatter(x: np.ndarray, y: np.ndarray, *, labels: np.ndarray | None = None, ax: Axes | None = None,
            title: str | None = None, xlabel: str | None = None, ylabel: str | None = None,
            size: float = 4.0, alpha: float = 0.6) -> Figure:
    """Points, coloured by ``labels`` (e.g. expert, or matched / unmatched) with a legend; the
    sorted labels take the router inspector's categorical colours in turn (so labels 0 to E-1 are
    the experts' own colours), which keep 16 of them apart."""
    fig, ax = _axes(ax)
    if labels is None:
        ax.scatter(x, y, s=size, alpha=alpha)
    else:
        labels = np.asarray(labels)
        kinds = np.unique(labels)
        for label, color in zip(kinds, expert_colors(len(kinds))):
            mask = labels == label
            ax.scatter(np.asarray(x)[mask], np.asarray(y)[mask], s=size, alpha=alpha, label=str(label), color=color)
    _finish(ax, xlabel, ylabel, title, False, False, legend=labels is not None)
    return fig


def grid(n_panels: int, columns: int = 2, panel_size: tuple[float, float] = (4.6, 3.4)) -> tuple[Figure, list[Axes]]:
    """A closed figure with ``n_panels`` axes in rows of ``columns``, for the ``ax=`` of the functions
    above; unused cells are hidden."""
    rows = -(-n_panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows),
                             layout="constrained", squeeze=False)
    plt.close(fig)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _finish(ax: Axes, xlabel: str | None, ylabel: str | None, title: str | None, logx: bool, logy: bool,
            legend: bool) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if legend:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plain_log_ticks(ax: Axes, ticks: Sequence[float] | None = None, axis: str = "x") -> None:
    """Label a log-scaled axis with plain numbers instead of powers of ten: at ``ticks`` (e.g. the
    swept widths), or at the 1-2-5 steps inside the axis' range; minor ticks are turned off."""
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    if ticks is None:
        decades = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        ticks = [m * 10.0**e for e in decades for m in (1, 2, 5) if low <= m * 10.0**e <= high]
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_ticks(list(ticks), [f"{t:g}" for t in ticks])
    target.set_minor_locator(NullLocator())
