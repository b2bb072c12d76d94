"""The live training dashboard, fed by a real Trainer through add_callback."""
import numpy as np
import pytest
import torch
from bokeh.document import Document

from workbench.saes import SwitchConfig, SwitchSAE, TopKConfig, TopKSAE
from workbench.train import TrainConfig, Trainer
from workbench.ui import TrainingDashboard


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


def _points(dashboard, metric, sae):
    """The curve's points as received, after checking that its source draws exactly those: the
    same steps and values, each segment starting at the point before, then only free NaN rows."""
    steps, values = dashboard.points[(metric, sae)]
    data = dashboard.sources[(metric, sae)].data
    n = len(steps)
    assert list(data["step"][:n]) == steps and list(data["value"][:n]) == values
    assert list(data["prev_step"][:n]) == steps[:1] + steps[:-1]
    assert all(np.isnan(data[column][n:]).all() for column in data)
    return steps, values


def test_every_logged_value_is_plotted_per_sae_and_metric(trained):
    dashboard, history = trained
    assert dashboard.rows == history and len(history) == 8  # steps 5, 10, 15, 20 for both SAEs
    for sae in ("topk", "switch"):
        rows = [r for r in history if r["sae"] == sae]
        metrics = [k for k, v in rows[0].items() if k not in ("step", "sae", "tokens", "lr") and not isinstance(v, list)]
        assert {"loss", "l0", "dead_fraction"} <= set(metrics)
        assert any(m.startswith("loss/") for m in metrics)
        for metric in metrics:
            assert _points(dashboard, metric, sae) == ([5, 10, 15, 20], [r[metric] for r in rows]), metric
    # One plot per metric, holding one curve per SAE that reports it.
    assert len(dashboard.figures["loss"].renderers) == 2 * 2  # a line and its markers per SAE
    assert "loss/auxk" in dashboard.figures and "loss/load_balance" in dashboard.figures


def test_switch_expert_load_has_one_curve_per_expert(trained):
    dashboard, history = trained
    rows = [r for r in history if r["sae"] == "switch"]
    for e in range(4):
        assert _points(dashboard, f"expert_load/{e}", "switch") == ([5, 10, 15, 20], [r["expert_load"][e] for r in rows])
    assert not any(metric.startswith("expert_load") for metric, sae in dashboard.sources if sae == "topk")
    assert sum(dashboard.points[(f"expert_load/{e}", "switch")][1][-1] for e in range(4)) == pytest.approx(1.0)


def test_a_new_loss_term_gets_its_own_curve():
    dashboard = TrainingDashboard()
    dashboard.callback({"step": 1, "sae": "mine", "tokens": 64, "lr": 1e-3, "loss": 1.0, "loss/mse": 1.0})
    dashboard.callback({"step": 2, "sae": "mine", "tokens": 128, "lr": 1e-3, "loss": 1.5, "loss/mse": 0.9,
                        "loss/orthogonality": 0.6})
    assert _points(dashboard, "loss/orthogonality", "mine") == ([2], [0.6])
    assert _points(dashboard, "loss/mse", "mine") == ([1, 2], [1.0, 0.9])
    fig = dashboard.figures["loss/orthogonality"]
    assert fig.renderers[0].data_source is dashboard.sources[("loss/orthogonality", "mine")]
    assert "step 2" in dashboard.__panel__()[0].object  # the status line above the plots


def test_renders_as_one_bokeh_document(trained):
    _, history = trained
    dashboard = TrainingDashboard()
    for row in history:
        dashboard.callback(row)
    doc = Document()
    root = dashboard.__panel__().get_root(doc)
    # Every plot is in the rendered page, and a later row still streams into the rendered plots.
    plotted = {m for m in root.select({"type": type(dashboard.figures["loss"])})}
    assert plotted == set(dashboard.figures.values())
    dashboard.callback({"step": 25, "sae": "topk", "tokens": 3200, "lr": 0.0, "loss": 0.5, "l0": 4.0})
    assert _points(dashboard, "loss", "topk")[0][-1] == 25
    assert dashboard.figures["loss"] in plotted  # a new point is a patch of the shown plot, not a redraw


def test_a_long_run_keeps_every_point_as_sources_fill_up():
    dashboard = TrainingDashboard()
    for step in range(1, 201):
        dashboard.callback({"step": step, "sae": "a", "tokens": step, "lr": 1e-3, "loss": 1 / step})
    steps, values = _points(dashboard, "loss", "a")
    assert steps == list(range(1, 201)) and values == [1 / step for step in range(1, 201)]
