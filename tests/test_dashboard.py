"""The live training dashboard, fed by a real Trainer: through add_callback during fit, and by a
background run (Trainer.start) whose thread only queues rows for the dashboard's thread to draw.
Without a browser: what each plot draws is read back from the SVG its pane holds."""
import asyncio
import re
import threading
import time

import pytest
import torch
from bokeh.document import Document

from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE
from workbench.train import TrainConfig, Trainer
from workbench.ui import TrainingDashboard
from workbench.ui.dashboard import COLORS, DASHES, MARKERS

pytestmark = pytest.mark.usefixtures("one_thread")


def two_saes():
    return {"topk": TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)),
            "switch": SwitchSAE(SwitchConfig(d_in=16, d_sae=64, k=4, n_experts=4))}


def batches(n, seed=0, delay=0.0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        if delay:
            time.sleep(delay)
        yield torch.randn(128, 16, generator=gen)


@pytest.fixture(scope="module")
def trained():
    """A TopK and a Switch SAE trained side by side for 20 steps, logged every 5, into a dashboard."""
    trainer = Trainer(two_saes(), TrainConfig(total_steps=20, log_every=5, lr=3e-3, progress_bar=False))
    dashboard = TrainingDashboard()
    trainer.add_callback(dashboard.callback)
    history = trainer.fit(batches(20))
    return dashboard, history


class Pause:
    """A callback that holds the training thread at one row until ``go`` is set."""

    def __init__(self, step, sae):
        self.step, self.sae = step, sae
        self.reached, self.go = threading.Event(), threading.Event()

    def __call__(self, row):
        if (row["step"], row["sae"]) == (self.step, self.sae):
            self.reached.set()
            assert self.go.wait(20)

    def wait(self):
        assert self.reached.wait(20), f"training never reached step {self.step}"


def _svg(dashboard, plot):
    return dashboard.plots[plot].object


def _drawn(dashboard, plot):
    """{curve label: its vertices (x, y) in pixels} as drawn in the plot's SVG."""
    return {label: [tuple(map(float, v.split(","))) for v in vertices.split()]
            for label, vertices in re.findall(r'class="wb-curve" data-label="([^"]*)" points="([^"]*)"',
                                              _svg(dashboard, plot))}


def _curve_styles(svg):
    """{label: (stroke colour, dash pattern)} of each curve."""
    styles = {}
    for element in re.findall(r'<polyline class="wb-curve"[^>]*>', svg):
        label = re.search(r'data-label="([^"]*)"', element).group(1)
        dash = re.search(r'stroke-dasharray="([^"]*)"', element)
        styles[label] = (re.search(r' stroke="([^"]*)"', element).group(1), dash.group(1) if dash else "")
    return styles


def _assert_drawn_as(vertices, steps, values):
    """One vertex per point, left to right in step order, higher values higher up (smaller y)."""
    assert len(vertices) == len(steps)
    xs, ys = zip(*vertices)
    assert list(xs) == sorted(xs)
    for (y_a, v_a), (y_b, v_b) in zip(zip(ys, values), zip(ys[1:], values[1:])):
        assert (y_a < y_b) == (v_a > v_b) or v_a == v_b


# -------------------------------------------------------------------------------------------------
# What is drawn

def test_every_logged_value_is_kept_and_drawn_per_sae_and_metric(trained):
    dashboard, history = trained
    assert dashboard.rows == history and len(history) == 8  # steps 5, 10, 15, 20 for both SAEs
    for sae in ("topk", "switch"):
        rows = [r for r in history if r["sae"] == sae]
        metrics = [k for k, v in rows[0].items() if k not in ("step", "sae", "tokens", "lr") and not isinstance(v, list)]
        assert {"loss", "l0", "dead_fraction"} <= set(metrics) and any(m.startswith("loss/") for m in metrics)
        for metric in metrics:
            steps, values = dashboard.points[(metric, sae)]
            assert (steps, values) == ([5, 10, 15, 20], [r[metric] for r in rows]), metric
            _assert_drawn_as(_drawn(dashboard, metric)[sae], steps, values)
    # One plot per metric, with one curve per SAE that reports it.
    assert set(_drawn(dashboard, "loss")) == {"topk", "switch"}
    assert set(_drawn(dashboard, "loss/auxk")) == {"topk"} and set(_drawn(dashboard, "loss/load_balance")) == {"switch"}


def test_switch_expert_load_has_one_curve_per_expert(trained):
    dashboard, history = trained
    rows = [r for r in history if r["sae"] == "switch"]
    drawn = _drawn(dashboard, "expert_load · switch")
    assert set(drawn) == {f"expert {e}" for e in range(4)}
    for e in range(4):
        steps, values = dashboard.points[(f"expert_load/{e}", "switch")]
        assert (steps, values) == ([5, 10, 15, 20], [r["expert_load"][e] for r in rows])
        _assert_drawn_as(drawn[f"expert {e}"], steps, values)
    assert sum(dashboard.points[(f"expert_load/{e}", "switch")][1][-1] for e in range(4)) == pytest.approx(1.0)
    assert not any(metric.startswith("expert_load") for metric, sae in dashboard.points if sae == "topk")


def test_legend_outside_the_plot_axis_titles_several_ticks_and_log_loss(trained):
    dashboard, _ = trained
    for plot in dashboard.plots:
        svg = _svg(dashboard, plot)
        area = re.search(r'class="wb-area" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
        area_bottom = float(area.group(2)) + float(area.group(4))
        legend_y = float(re.search(r'class="wb-legend" transform="translate\([\d.]+,([\d.]+)\)"', svg).group(1))
        assert legend_y > area_bottom + 20, plot  # under the plot and its x tick labels, not over the curves
        assert len(re.findall(r'class="wb-legend-entry"', svg)) == len(_drawn(dashboard, plot))
        assert len(re.findall(r'class="wb-xtick"', svg)) >= 3 and len(re.findall(r'class="wb-ytick"', svg)) >= 3, plot
        assert re.search(r'class="wb-xtitle"[^>]*>step<', svg)
        assert re.search(r'class="wb-ytitle"[^>]*>[^<]+<', svg)
    for plot in ("loss", "mse", "loss/fvu", "loss/mse"):
        assert 'data-y-scale="log"' in _svg(dashboard, plot), plot
        assert re.search(rf'class="wb-ytitle"[^>]*>{plot} \(log\)<', _svg(dashboard, plot))
    for plot in ("l0", "dead_fraction", "load_balance", "expert_load · switch"):
        assert 'data-y-scale="linear"' in _svg(dashboard, plot), plot
    # The x axis spans the steps: its last tick at the last step, its ticks round numbers.
    xticks = [t for t in re.findall(r'class="wb-xtick"[^>]*>([^<]+)<', _svg(dashboard, "loss"))]
    assert xticks[0] == "0" and xticks[-1] == "20"


def test_a_loss_spanning_decades_gets_decade_ticks_on_a_log_axis():
    dashboard = TrainingDashboard()
    for step, (a, b) in enumerate([(3.3, 0.9), (1.0, 0.5), (0.4, 0.25)], start=1):
        dashboard.callback({"step": step, "sae": "topk", "tokens": step, "mse": a})
        dashboard.callback({"step": step, "sae": "switch", "tokens": step, "mse": b})
    svg = _svg(dashboard, "mse")
    assert 'data-y-scale="log"' in svg
    ticks = [float(t) for t in re.findall(r'class="wb-ytick"[^>]*>([^<]+)<', svg)]
    assert 3 <= len(ticks) <= 7 and {0.5, 1.0, 2.0} <= set(ticks)
    # On a log axis equal ratios are equal distances: 3.3 -> 1.0 as far as 1.0 -> 0.303.
    ys = dict(zip(("topk", "switch"), (v for v in _drawn(dashboard, "mse").values())))
    y_33, y_10 = ys["topk"][0][1], ys["topk"][1][1]
    assert y_10 - y_33 == pytest.approx(_y_of(svg, 1.0) - _y_of(svg, 3.3), abs=0.2)
    # A loss that reaches 0 (a dead-latent loss before any latent died) stays on a linear axis.
    dashboard.callback({"step": 1, "sae": "topk", "tokens": 1, "loss/auxk": 0.0})
    dashboard.callback({"step": 2, "sae": "topk", "tokens": 2, "loss/auxk": 0.3})
    assert 'data-y-scale="linear"' in _svg(dashboard, "loss/auxk")


def _y_of(svg, value):
    """The pixel y of ``value`` on the plot's log axis, from two of its ticks."""
    import math
    ticks = [(float(v), float(y)) for y, v in re.findall(r'class="wb-ytick" x="[\d.]+" y="([\d.]+)"[^>]*>([^<]+)<', svg)]
    (v0, y0), (v1, y1) = ticks[0], ticks[-1]
    return y0 + (y1 - y0) * (math.log10(value) - math.log10(v0)) / (math.log10(v1) - math.log10(v0))


def test_identical_curves_stay_distinguishable_with_eight_of_them():
    """Eight experts with exactly the same load, and TopK and Switch with L0 exactly k: each curve
    has its own colour and dash, and its markers sit at other points than the others'."""
    dashboard = TrainingDashboard()
    for step in range(1, 31):
        for sae in ("topk", "switch"):
            dashboard.callback({"step": step, "sae": sae, "tokens": step, "l0": 16.0,
                                **({"expert_load": [1 / 8] * 8} if sae == "switch" else {})})
    for plot, n in (("l0", 2), ("expert_load · switch", 8)):
        svg = _svg(dashboard, plot)
        drawn = _drawn(dashboard, plot)
        assert len(set(map(tuple, drawn.values()))) == 1  # the same vertices: drawn over each other
        styles = _curve_styles(svg)
        assert len(set(styles.values())) == n  # ... but no two alike
        assert list(styles.values()) == [(COLORS[i % len(COLORS)], DASHES[i % len(DASHES)]) for i in range(n)]
        markers = [set(re.findall(r'class="wb-marker" data-step="(\d+)"', m)) for m in _markers_by_curve(svg)]
        assert len(markers) == n and all(markers)
        assert all(a.isdisjoint(b) for i, a in enumerate(markers) for b in markers[i + 1:])
    assert len(set(MARKERS)) == len(MARKERS) == len(DASHES)
    # The flat L0 of 16 sits on an axis of round ticks around it, not on a -1..1 one.
    ticks = [float(t) for t in re.findall(r'class="wb-ytick"[^>]*>([^<]+)<', _svg(dashboard, "l0"))]
    assert min(ticks) <= 16 <= max(ticks) and min(ticks) > 10


def _markers_by_curve(svg):
    """The SVG of each curve's staggered markers: the text between one curve and the next."""
    pieces = re.split(r'<polyline class="wb-curve"', svg)[1:]
    return [re.sub(r'<g class="wb-legend".*', "", p) for p in pieces]


def test_a_list_metric_gets_a_curve_per_entry_named_by_its_first_word():
    dashboard = TrainingDashboard()
    for step, prefix_mse in [(1, [0.9, 0.5, 0.3]), (2, [0.8, 0.4, 0.25])]:
        dashboard.callback({"step": step, "sae": "matry", "tokens": 64 * step, "loss": 1.0, "prefix_mse": prefix_mse})
    drawn = _drawn(dashboard, "prefix_mse · matry")
    assert set(drawn) == {"prefix 0", "prefix 1", "prefix 2"}
    assert dashboard.points[("prefix_mse/1", "matry")] == ([1, 2], [0.5, 0.4])
    _assert_drawn_as(drawn["prefix 2"], [1, 2], [0.3, 0.25])
    assert 'data-y-scale="log"' in _svg(dashboard, "prefix_mse · matry")


def test_a_new_loss_term_gets_its_own_curve():
    dashboard = TrainingDashboard()
    dashboard.callback({"step": 1, "sae": "mine", "tokens": 64, "lr": 1e-3, "loss": 1.0, "loss/mse": 1.0})
    dashboard.callback({"step": 2, "sae": "mine", "tokens": 128, "lr": 1e-3, "loss": 1.5, "loss/mse": 0.9,
                        "loss/orthogonality": 0.6})
    assert dashboard.points[("loss/orthogonality", "mine")] == ([2], [0.6])
    assert len(_drawn(dashboard, "loss/orthogonality")["mine"]) == 1
    _assert_drawn_as(_drawn(dashboard, "loss/mse")["mine"], [1, 2], [1.0, 0.9])
    assert list(dashboard.plots) == ["loss", "loss/mse", "loss/orthogonality"]
    assert "step 2" in dashboard.status.object  # the status line above the plots


def test_a_long_run_is_drawn_from_a_bounded_number_of_points():
    dashboard = TrainingDashboard()
    for step in range(1, 2001):
        dashboard.callback({"step": step, "sae": "a", "tokens": step, "lr": 1e-3, "loss": 1 / step})
    assert dashboard.points[("loss", "a")][0] == list(range(1, 2001))
    vertices = _drawn(dashboard, "loss")["a"]
    assert 300 < len(vertices) <= 401
    assert vertices[-1][0] == max(x for x, _ in vertices)  # the newest point is always drawn


def test_dead_fraction_is_drawn_once_the_dead_window_has_filled():
    """The trainer's dead_fraction counts the latents silent for its dead window, and before the
    window has filled the ones silent since the start (nearly always 0): hidden until then, with
    the window's progress in the status line."""
    trainer = Trainer(two_saes(), TrainConfig(total_steps=8, log_every=1, lr=3e-3, progress_bar=False,
                                              dead_window_tokens=3 * 128))
    dashboard = TrainingDashboard()
    dashboard.attach(trainer)
    seen = []
    trainer.add_callback(lambda row: seen.append(("dead_fraction" in dashboard.plots, dashboard.status.object)))
    history = trainer.fit(batches(8))
    assert [shown for shown, _ in seen] == [False] * 4 + [True] * 12  # from step 3, both SAEs
    assert "dead_fraction: window 384 tokens, filled at 66.7%; drawn once it is full" in seen[3][1]
    assert "dead_fraction" not in seen[4][1]
    for sae in ("topk", "switch"):
        rows = [r for r in history if r["sae"] == sae]
        assert dashboard.points[("dead_fraction", sae)][0] == list(range(1, 9))  # every value kept
        _assert_drawn_as(_drawn(dashboard, "dead_fraction")[sae], list(range(3, 9)),
                         [r["dead_fraction"] for r in rows][2:])  # drawn from step 3
    assert "8 of 8" in dashboard.status.object  # attached: the status knows the run's length


def test_renders_as_one_bokeh_document(trained):
    dashboard, _ = trained
    doc = Document()
    root = dashboard.__panel__().get_root(doc)
    rendered = [m.text for m in root.references() if "wb-plot" in str(getattr(m, "text", ""))]
    assert len(rendered) == len(dashboard.plots) and all("wb-curve" in text for text in rendered)


# -------------------------------------------------------------------------------------------------
# A background run

def test_a_background_run_is_queued_by_its_thread_and_drawn_by_the_dashboards():
    trainer = Trainer(two_saes(), TrainConfig(total_steps=20, log_every=5, lr=3e-3, progress_bar=False))
    at_10, at_20 = Pause(10, "switch"), Pause(20, "topk")
    trainer.add_callback(at_10)
    trainer.add_callback(at_20)
    dashboard = TrainingDashboard()
    run = trainer.start(batches(20))
    try:
        at_10.wait()
        dashboard.attach(run)  # draws the four rows logged so far, at once
        assert dashboard.points[("loss", "topk")][0] == [5, 10]
        assert not dashboard.stop_button.disabled and "training" in dashboard.status.object
        at_10.go.set()
        at_20.wait()  # rows 15 have reached the dashboard's callback in the training thread...
        assert [r["step"] for r in run.history] == [5, 5, 10, 10, 15, 15, 20]
        assert dashboard.points[("loss", "topk")][0] == [5, 10]  # ... which only queued them
        assert len(_drawn(dashboard, "loss")["topk"]) == 2
        dashboard.refresh()  # the dashboard's thread draws them
        assert dashboard.points[("loss", "switch")][0] == [5, 10, 15]
        assert len(_drawn(dashboard, "loss")["switch"]) == 3
    finally:
        at_10.go.set()
        at_20.go.set()
    history = run.wait()  # draws the rest from this (the dashboard's) thread
    assert dashboard.rows == history  # each row once, though the step-10 Switch row came both ways
    assert dashboard.points[("loss", "topk")] == ([5, 10, 15, 20], [r["loss"] for r in history if r["sae"] == "topk"])
    assert "**finished**" in dashboard.status.object and dashboard.stop_button.disabled


def test_the_stop_button_stops_the_run(tmp_path):
    trainer = Trainer(two_saes(), TrainConfig(total_steps=40, log_every=5, lr=3e-3, progress_bar=False),
                      run_dir=tmp_path)
    pause = Pause(10, "switch")
    trainer.add_callback(pause)
    run = trainer.start(batches(40))
    dashboard = TrainingDashboard(run)  # the same as attach(run)
    try:
        pause.wait()
        dashboard.stop_button.clicks += 1  # what a click in the browser does
        assert "stopping at the next step" in dashboard.status.object and dashboard.stop_button.disabled
    finally:
        pause.go.set()
    run.wait()
    assert run.stopped and run.step == 10
    assert "**stopped** at step 10 (checkpointed" in dashboard.status.object
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000010\n"


def test_while_a_notebook_awaits_the_run_its_event_loop_draws_the_rows():
    """As under Run All in Jupyter: the dashboard is made on a running event loop, training starts,
    and ``await run`` leaves the loop free; the rows are drawn while the run trains, with no
    refresh called."""
    async def notebook():
        trainer = Trainer(two_saes(), TrainConfig(total_steps=40, log_every=5, lr=3e-3, progress_bar=False))
        dashboard = TrainingDashboard()
        run = trainer.start(batches(40, delay=0.04))  # about 1.6 s
        dashboard.attach(run)
        drawn_while_training = set()

        async def look():
            while run.running:
                if "loss" in dashboard.plots:
                    drawn_while_training.add(len(_drawn(dashboard, "loss")["topk"]))
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(look())
        history = await run
        await watcher
        return dashboard, history, drawn_while_training

    dashboard, history, drawn_while_training = asyncio.run(notebook())
    assert any(0 < n < 8 for n in drawn_while_training), drawn_while_training
    assert dashboard.rows == history and len(_drawn(dashboard, "loss")["topk"]) == 8
    assert "**finished**" in dashboard.status.object
