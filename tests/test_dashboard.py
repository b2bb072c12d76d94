"""The live training dashboard, fed by a real Trainer through add_callback."""
import re

import pytest
import torch
from bokeh.document import Document

from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE
from workbench.train import TrainConfig, Trainer
from workbench.ui import TrainingDashboard

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A TopK and a Switch SAE trained side by side for 20 steps, logged every 5, into a dashboard."""
    saes = {"topk": TopKSAE(TopKConfig(d_in=16, d_sae=64, k=4)),
            "switch": SwitchSAE(SwitchConfig(d_in=16, d_sae=64, k=4, n_experts=4))}
    trainer = Trainer(saes, TrainConfig(total_steps=20, log_every=5, lr=3e-3, progress_bar=False))
    dashboard = TrainingDashboard()
    trainer.add_callback(dashboard.callback)
    gen = torch.Generator().manual_seed(0)
    history = trainer.fit(torch.randn(128, 16, generator=gen) for _ in range(20))
    return dashboard, history


def _drawn(dashboard, plot):
    """{curve label: its vertices (x, y) in pixels} as drawn in the plot's SVG."""
    svg = dashboard.plots[plot].object
    return {label: [tuple(map(float, v.split(","))) for v in vertices.split()]
            for label, vertices in re.findall(r'class="wb-curve" data-label="([^"]*)" points="([^"]*)"', svg)}


def _assert_drawn_as(vertices, steps, values):
    """One vertex per point, left to right in step order, higher values higher up (smaller y)."""
    assert len(vertices) == len(steps)
    xs, ys = zip(*vertices)
    assert list(xs) == sorted(xs)
    for (y_a, v_a), (y_b, v_b) in zip(zip(ys, values), zip(ys[1:], values[1:])):
        assert (y_a < y_b) == (v_a > v_b) or v_a == v_b


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


def test_a_list_metric_gets_a_curve_per_entry_named_by_its_first_word():
    dashboard = TrainingDashboard()
    for step, prefix_mse in [(1, [0.9, 0.5, 0.3]), (2, [0.8, 0.4, 0.25])]:
        dashboard.callback({"step": step, "sae": "matry", "tokens": 64 * step, "loss": 1.0, "prefix_mse": prefix_mse})
    drawn = _drawn(dashboard, "prefix_mse · matry")
    assert set(drawn) == {"prefix 0", "prefix 1", "prefix 2"}
    assert dashboard.points[("prefix_mse/1", "matry")] == ([1, 2], [0.5, 0.4])
    _assert_drawn_as(drawn["prefix 2"], [1, 2], [0.3, 0.25])


def test_a_new_loss_term_gets_its_own_curve():
    dashboard = TrainingDashboard()
    dashboard.callback({"step": 1, "sae": "mine", "tokens": 64, "lr": 1e-3, "loss": 1.0, "loss/mse": 1.0})
    dashboard.callback({"step": 2, "sae": "mine", "tokens": 128, "lr": 1e-3, "loss": 1.5, "loss/mse": 0.9,
                        "loss/orthogonality": 0.6})
    assert dashboard.points[("loss/orthogonality", "mine")] == ([2], [0.6])
    assert len(_drawn(dashboard, "loss/orthogonality")["mine"]) == 1
    _assert_drawn_as(_drawn(dashboard, "loss/mse")["mine"], [1, 2], [1.0, 0.9])
    assert list(dashboard.plots) == ["loss", "loss/mse", "loss/orthogonality"]
    assert "step 2" in dashboard.__panel__()[0].object  # the status line above the plots


def test_a_long_run_is_drawn_from_a_bounded_number_of_points():
    dashboard = TrainingDashboard()
    for step in range(1, 2001):
        dashboard.callback({"step": step, "sae": "a", "tokens": step, "lr": 1e-3, "loss": 1 / step})
    assert dashboard.points[("loss", "a")][0] == list(range(1, 2001))
    vertices = _drawn(dashboard, "loss")["a"]
    assert 300 < len(vertices) <= 401
    assert vertices[-1][0] == max(x for x, _ in vertices)  # the newest point is always drawn


def test_renders_as_one_bokeh_document(trained):
    dashboard, _ = trained
    doc = Document()
    root = dashboard.__panel__().get_root(doc)
    rendered = [m.text for m in root.references() if "wb-plot" in str(getattr(m, "text", ""))]
    assert len(rendered) == len(dashboard.plots) and all("wb-curve" in text for text in rendered)
