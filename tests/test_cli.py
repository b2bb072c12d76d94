"""The ``workbench`` command as a user runs it: train from a config file, help, errors, resume."""
import json

import pytest
import torch

from workbench import io
from workbench.cli import build_parser, main

TINY = """\
run_dir: {run_dir}
train: {{total_steps: 40, lr: 3e-3, log_every: 10, checkpoint_every: 20, progress_bar: false}}
data:
  source: synthetic
  batch_size: 128
  eval_tokens: 512
  synthetic: {{d: 16, n_features: 48, mean_active: 3}}
saes:
  topk:   {{architecture: topk, d_sae: 64, k: 3}}
  switch: {{architecture: switch, d_sae: 64, k: 3, n_experts: 4}}
"""


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_train_writes_sae_folders_metrics_and_table(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, TINY.format(run_dir=run_dir)))]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["SAE", "MSE", "FVU", "L0", "dead", "gamma", "recovery"]
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["topk", "switch"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"topk", "switch"} and metrics["topk"]["l0"] <= 3
    sae = io.load(run_dir / "saes" / "switch")
    assert sae.cfg.d_in == 16 and sae.cfg.n_experts == 4
    assert (run_dir / "checkpoints" / "step_00000020").is_dir()


MODERN = """\
run_dir: {run_dir}
train: {{total_steps: 30, lr: 3e-3, progress_bar: false, dead_window_tokens: 1024}}
data: {{source: synthetic, batch_size: 128, eval_tokens: 512, synthetic: {{d: 16, n_features: 48, mean_active: 3}}}}
saes:
  btk:   {{architecture: batchtopk, d_sae: 64, k: 3}}
  jump:  {{architecture: jumprelu, d_sae: 64, l0_coefficient: 0.01, l0_warmup_steps: 10, init_threshold: 0.1}}
  matry: {{architecture: matryoshka_batchtopk, d_sae: 64, k: 3, matryoshka_widths: [8, 16, 64]}}
"""


def test_train_the_modern_architectures_from_yaml(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(_write(tmp_path, MODERN.format(run_dir=run_dir)))]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["btk"]["l0"] == pytest.approx(3, rel=0.5) and metrics["btk"]["threshold"] > 0
    assert len(metrics["matry"]["prefix_mse"]) == 3
    assert metrics["matry"]["prefix_mse"][0] > metrics["matry"]["prefix_mse"][-1] == pytest.approx(metrics["matry"]["mse"])
    loaded = {name: io.load(run_dir / "saes" / name) for name in ("btk", "jump", "matry")}
    assert [type(s).__name__ for s in loaded.values()] == ["BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE"]
    assert loaded["matry"].cfg.matryoshka_widths == [8, 16, 64]
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:5]] == ["btk", "jump", "matry"]


def test_train_help_lists_every_architecture_and_its_fields(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for arch, field in [("batchtopk", "threshold_momentum"), ("jumprelu", "bandwidth"),
                        ("matryoshka_batchtopk", "matryoshka_widths"), ("switch", "n_experts")]:
        assert f"architecture: {arch}" in text and field in text


def test_json_config_and_run_dir_override(tmp_path):
    cfg = {"train": {"total_steps": 5, "progress_bar": False}, "run_dir": "ignored",
           "data": {"source": "synthetic", "batch_size": 64, "eval_tokens": 128, "synthetic": {"d": 8, "n_features": 16, "mean_active": 2}},
           "saes": {"g": {"architecture": "gated", "d_sae": 32}}}
    path = _write(tmp_path, json.dumps(cfg), "run.json")
    assert main(["train", str(path), "--run-dir", str(tmp_path / "here")]) == 0
    assert io.load(tmp_path / "here" / "saes" / "g").cfg.architecture == "gated"


def test_resume_continues_to_the_same_weights(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    main(["train", str(_write(tmp_path, TINY.format(run_dir=straight), "a.yaml"))])

    interrupted = tmp_path / "interrupted"
    config = _write(tmp_path, TINY.format(run_dir=interrupted), "b.yaml")
    # The first attempt's stream runs dry after 20 batches, right after its step-20 checkpoint.
    from workbench.data.synthetic import SyntheticData
    full = SyntheticData.batches
    with monkeypatch.context() as patch:
        patch.setattr(SyntheticData, "batches", lambda self, size, n=None, seed=0: full(self, size, 20, seed))
        with pytest.warns(UserWarning):
            main(["train", str(config)])
    assert main(["train", str(config), "--resume"]) == 0
    for name in ("topk", "switch"):
        a, b = io.load(straight / "saes" / name), io.load(interrupted / "saes" / name)
        for (pname, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), (name, pname)


def test_help_is_generated_from_field_docstrings():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "Weight alpha of the load-balancing loss (3 in the paper's runs)." in text
    assert "Fraction of ``total_steps`` at the end over which the lr decays linearly to 0." in text
    assert "saes.<name> with architecture: gated" in text


@pytest.mark.parametrize("text, message", [
    ("train: {total_steps: 5}\nsaes: {a: {architecture: topk, d_sae: 64, k: 3}}\nmodel: gpt2\n",
     "config: unknown key(s) ['model']; valid keys are ['data', 'run_dir', 'saes', 'train']"),
    ("train: {total_steps: 5, lr_rate: 1}\nsaes: {a: {architecture: topk, d_sae: 64, k: 3}}\n",
     "config.train: unknown key(s) ['lr_rate']"),
    ("train: {total_steps: 5}\nsaes: {a: {architecture: topk, d_sae: 64, k: 64}}\n",
     "saes.a: k=64 must be smaller than the number of latents d_sae (64)"),
    ("train: {total_steps: 5}\nsaes: {a: {architecture: moe, d_sae: 64}}\n", "saes.a: unknown architecture 'moe'"),
    ("train: {total_steps: 0}\nsaes: {a: {architecture: topk, d_sae: 64, k: 3}}\n",
     "TrainConfig.total_steps=0 must be a positive integer"),
    ("saes: {a: {architecture: topk, d_sae: 64, k: 3}}\n", "config: missing required key(s) ['train']"),
    ("train: {total_steps: 5\n", "is not valid YAML"),
])
def test_bad_configs_exit_with_one_line(tmp_path, capsys, text, message):
    assert main(["train", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file" in capsys.readouterr().err


def test_synthetic_demo_prints_topk_recovering_the_true_features(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--steps", "600", "--run-dir", str(tmp_path / "demo")]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line.split() for line in lines if line.startswith("SAE "))
    rows = {line.split()[0]: line.split() for line in lines if line.split()[:1] in (["topk"], ["gated"],
                                                                                    ["relu"], ["switch"])}
    assert set(rows) == {"topk", "gated", "relu", "switch"}
    assert float(rows["topk"][header.index("recovery")]) >= 0.9
    assert {p.name for p in (tmp_path / "demo" / "saes").iterdir()} == set(rows)


# -------------------------------------------------------------------------------------------------
# workbench browse --sae: any SAE folder or hub id (the browser itself is tested in test_ui_app.py)


def _one_line_error(capsys, command="browse"):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"workbench {command}: error: "), err
    return err.removeprefix(f"workbench {command}: error: ").strip()


def _metadata_less_sae(tmp_path):
    from workbench.saes import build_sae, make_config
    return io.save(build_sae(make_config("topk", d_in=16, d_sae=32, k=2)), tmp_path / "sae", metadata={})


def test_browse_sae_without_model_and_site_names_the_flags(tmp_path, capsys):
    folder = _metadata_less_sae(tmp_path)
    assert main(["browse", "--sae", str(folder)]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"{folder} does not say which model and site it reads")
    assert "pass --model NAME --site SITE" in err


@pytest.mark.parametrize("argv, message", [
    (["browse"], ("nothing to browse: give a run folder (workbench browse RUN_DIR), or an SAE folder or hub id "
                  "(workbench browse --sae PATH_OR_HUB_ID)")),
    (["browse", "runs/demo", "--model", "gpt2", "--eval-tokens", "100"],
     "--eval-tokens, --model apply to an SAE browsed without a run (--sae PATH_OR_HUB_ID)"),
    (["browse", "--sae", "nobody-here/no-such-sae"],
     "'nobody-here/no-such-sae' is not a local folder and the Hugging Face hub did not provide it"),
    (["browse", "--sae", "no/such/folder"], "no SAE folder at no/such/folder"),
])
def test_browse_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_browse_an_sae_folder_as_a_run_says_to_pass_sae(tmp_path, capsys):
    folder = _metadata_less_sae(tmp_path)
    assert main(["browse", str(folder)]) == 2
    assert _one_line_error(capsys) == (f"{folder} is an SAE folder, not a run folder; browse it with "
                                       f"`workbench browse --sae {folder}` (build_app(sae=...))")


def test_browse_sae_passes_its_flags_to_serve(monkeypatch):
    calls = []
    monkeypatch.setattr("workbench.ui.app.serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert main(["browse", "--sae", "owner/repo", "--subfolder", "layer_2", "--model", "gpt2",
                 "--site", "blocks.2.hook_resid_post", "--text", "cpython", "--eval-tokens", "4096"]) == 0
    assert main(["browse", "runs/demo", "--sae", "topk", "--port", "5007"]) == 0
    assert calls == [
        ((None,), {"port": 5006, "address": "127.0.0.1", "sae": "owner/repo", "subfolder": "layer_2",
                   "model": "gpt2", "site": "blocks.2.hook_resid_post", "text": "cpython", "eval_tokens": 4096}),
        (("runs/demo",), {"port": 5007, "address": "127.0.0.1", "sae": "topk"}),
    ]


def test_browse_help_describes_both_uses(capsys):
    with pytest.raises(SystemExit):
        main(["browse", "--help"])
    text = capsys.readouterr().out
    assert "RUN_DIR" in text and "--sae NAME | PATH_OR_HUB_ID" in text
    for flag in ("--subfolder", "--model", "--site", "--text", "--eval-tokens"):
        assert flag in text
    assert "default: 127.0.0.1" in text
