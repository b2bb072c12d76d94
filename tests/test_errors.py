"""Bad input as a user gives it: each case ends in one line that names the value and the fix, with
exit status 2, never a traceback from inside a library nor a run that saves NaN weights."""
import copy
import errno
import json
import math
import re
import shutil

import pytest
import torch
import yaml

from workbench.cli import main
from workbench.data.embedded import default_model_path, load_model
from workbench.data.store import CacheError
from workbench.data.text import load_texts
from workbench.saes import ARCHITECTURES

BASE = {
    "train": {"total_steps": 4, "log_every": 2, "progress_bar": False},
    "data": {"source": "synthetic", "batch_size": 64, "eval_tokens": 128,
             "synthetic": {"d": 16, "n_features": 32, "mean_active": 3}},
    "saes": {"my_sae": {"architecture": "relu", "d_sae": 32}},
}


def _config(tmp_path, edit=None, **sections):
    """A tiny synthetic run's config file, with ``edit(cfg)`` applied."""
    cfg = copy.deepcopy(BASE) | {"run_dir": str(tmp_path / "run")} | sections
    if edit:
        edit(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _error(capsys, command="train"):
    """The error line the command printed to stderr last (progress bars may come before it)."""
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"workbench {command}: error: "), err
    return last.removeprefix(f"workbench {command}: error: ")


def _set(path, value):
    def edit(cfg):
        *parents, name = path.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return edit


# -------------------------------------------------------------------------------------------------
# Types and finiteness of every numeric field


@pytest.mark.parametrize("path, value, message", [
    ("train.lr", "abc", "config: train.lr='abc' must be a number"),
    ("train.total_steps", True, "config: train.total_steps=True must be an integer"),
    ("train.betas", [0.9, math.nan], "config: train.betas=[0.9, nan] must be a list of 2 finite numbers"),
    ("data.model.n_tokens", 2e5, "config: data.model.n_tokens=200000.0 must be an integer; write 200000"),
    ("data.model.drop_outliers", math.nan, "config: data.model.drop_outliers=nan must be a finite number"),
    ("data.synthetic.mean_active", math.inf, "config: data.synthetic.mean_active=inf must be a finite number"),
    ("saes.my_sae.l1_coefficient", math.nan, "saes.my_sae: l1_coefficient=nan must be a finite number"),
    ("saes.my_sae.l1_coefficient", -math.inf, "saes.my_sae: l1_coefficient=-inf must be a finite number"),
    ("saes.my_sae.l1_coefficient", "x", "saes.my_sae: l1_coefficient='x' must be a number"),
    ("saes.my_sae.seed", "0", "saes.my_sae: seed='0' must be an integer; write 0 without quotes"),
])
def test_wrong_type_or_nan_in_yaml_is_one_line_naming_the_field(tmp_path, capsys, path, value, message):
    assert main(["train", _config(tmp_path, _set(path, value))]) == 2
    assert _error(capsys).startswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sae, message", [
    ({"architecture": "switch", "d_sae": 32, "k": 2, "n_experts": 4, "lb_alpha": "x"},
     "saes.my_sae: lb_alpha='x' must be a number"),
    ({"architecture": "topk", "d_sae": 32, "k": 2, "k_aux": 1.5}, "saes.my_sae: k_aux=1.5 must be an integer"),
    ({"architecture": "jumprelu", "d_sae": 32, "l0_coefficient": math.nan},
     "saes.my_sae: l0_coefficient=nan must be a finite number"),
])
def test_wrong_type_in_other_architectures(tmp_path, capsys, sae, message):
    assert main(["train", _config(tmp_path, saes={"my_sae": sae})]) == 2
    assert _error(capsys).startswith(message)


FLOAT_FIELD = {"relu": "l1_coefficient", "gated": "l1_coefficient", "topk": "auxk_coef", "switch": "lb_alpha",
               "batchtopk": "threshold_momentum", "jumprelu": "l0_coefficient", "matryoshka_batchtopk": "auxk_coef"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_every_architecture_refuses_nan_and_inf_from_python(arch, bad):
    cfg_cls = ARCHITECTURES[arch][0]
    field = FLOAT_FIELD[arch]
    cfg = cfg_cls(d_in=16, d_sae=64, **{field: bad})
    with pytest.raises(ValueError, match=f"^{field}={bad!r} must be a finite number$"):
        cfg.validate()


# -------------------------------------------------------------------------------------------------
# Text and model sources


def _model_config(tmp_path, **model):
    """A run on model activations (``model``: the data.model fields), cached under tmp_path."""
    return _config(tmp_path, lambda cfg: cfg["data"].update(
        source="model", model={"cache_dir": str(tmp_path / "cache"), **model}))


def test_empty_jsonl_text_is_one_line(tmp_path, capsys):
    empty = tmp_path / "corpus.jsonl"
    empty.write_text("")
    assert main(["train", _model_config(tmp_path, text=str(empty))]) == 2
    assert _error(capsys) == (f"text file {str(empty)!r} is empty; give a file with text in it "
                              f"(.txt: one text per line; .jsonl: one {{\"text\": ...}} object per line)")


@pytest.mark.parametrize("name, content", [("corpus.txt", ""), ("corpus.txt", "\n\n  \n"), ("rows.jsonl", "\n")])
def test_empty_or_blank_text_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^text file '{path}' is empty; give a file with text in it"):
        list(load_texts(path))




def test_missing_model_folder_says_so_without_a_hub_download(tmp_path, capsys):
    folder = tmp_path / "models" / "gpt2-local"
    assert main(["train", _model_config(tmp_path, name=str(folder))]) == 2
    err = _error(capsys)
    assert err.startswith(f"no model folder at {str(folder)!r}; check the path") and "hf download" not in err


def test_relative_path_with_an_existing_parent_is_a_folder_not_a_hub_name(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("models/gpt2-local", "./gpt2-local"):
        with pytest.raises(FileNotFoundError, match=f"^no model folder at '{name}'"):
            load_model(name)


def test_model_folder_with_only_config_json_names_what_is_missing(tmp_path, capsys):
    folder = tmp_path / "half"
    folder.mkdir()
    shutil.copy(default_model_path() / "config.json", folder)
    assert main(["train", _model_config(tmp_path, name=str(folder))]) == 2
    assert _error(capsys) == (
        f"model folder {str(folder)!r} has no weights (model.safetensors or pytorch_model.bin) and no tokenizer "
        f"files (tokenizer.json or tokenizer_config.json); write the folder with model.save_pretrained(DIR) "
        f"and tokenizer.save_pretrained(DIR)")
    shutil.copy(default_model_path() / "model.safetensors", folder)
    with pytest.raises(ValueError, match=r"has no tokenizer files \(tokenizer.json or tokenizer_config.json\);"):
        load_model(folder)


# -------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpointed(tmp_path):
    return _config(tmp_path, _set("train.checkpoint_every", 2))


def test_corrupt_trainer_state_says_how_to_resume_from_an_earlier_checkpoint(tmp_path, capsys):
    config = _checkpointed(tmp_path)
    assert main(["train", config]) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000004" / "trainer_state.pt").write_bytes(b"garbage" * 100)
    capsys.readouterr()
    assert main(["train", config, "--resume"]) == 2
    err = _error(capsys)
    assert err == (f"checkpoint {ckpts / 'step_00000004'} is damaged: its trainer_state.pt is truncated or not a "
                   f"trainer state; delete {ckpts / 'step_00000004'} and resume again to continue from "
                   f"step_00000002, the newest earlier checkpoint")
    assert "weights_only" not in err


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1664 vs 1558"),
])
def test_full_disk_at_a_checkpoint_removes_its_partial_write(tmp_path, capsys, monkeypatch, failure):
    def no_space(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", no_space)
    assert main(["train", _checkpointed(tmp_path)]) == 2
    ckpts = tmp_path / "run" / "checkpoints"
    assert re.fullmatch(rf"no space left on {re.escape(str(ckpts))}: a checkpoint needs about [0-9.,]+ MB; "
                        rf"free space or set checkpoint_every higher", _error(capsys))
    assert not list(ckpts.glob(".*.tmp"))


# -------------------------------------------------------------------------------------------------
# Looking inside a run


@pytest.fixture
def model_run(tmp_path):
    """A finished run's folder whose model does not exist: loading it would fail with another message."""
    run_dir = tmp_path / "run"
    saes = {"a": {"architecture": "topk", "d_sae": 64, "k": 4}, "b": {"architecture": "topk", "d_sae": 64, "k": 4}}
    config = {"run_dir": str(run_dir), "train": {"total_steps": 2}, "saes": saes,
              "data": {"source": "model", "model": {"name": str(tmp_path / "no-model")}}}
    for name in saes:
        (run_dir / "saes" / name).mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


@pytest.mark.parametrize("command", ["index", "browse"])
def test_unknown_sae_fails_before_indexing_or_loading_the_model(model_run, capsys, command):
    assert main([command, str(model_run), "--sae", "nope"]) == 2
    assert _error(capsys, command) == f"no SAE named 'nope' in {model_run}; it has a, b"
    assert not (model_run / "features").exists()


def test_cache_error_is_one_line(tmp_path, capsys, monkeypatch):
    def damaged(*args, **kwargs):
        raise CacheError("cache folder /cache/x is damaged: shard 3 is truncated; delete the folder to harvest "
                         "it again")

    monkeypatch.setattr("workbench.cli.run", damaged)
    assert main(["train", _config(tmp_path)]) == 2
    assert _error(capsys).startswith("cache folder /cache/x is damaged")
