"""The quick/paper profiles the notebooks read, and what run() leaves behind for them
(history.json, overwrite=True)."""
import json

import pytest

from workbench.profiles import PROFILE_ENV, get_profile
from workbench.run import RunConfig, read_history, run
from workbench.saes import make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, "paper")
    assert get_profile().name == "paper"
    monkeypatch.delenv(PROFILE_ENV)
    assert get_profile().name == "quick"
    assert get_profile("paper").data.model.name == "gpt2"


def test_unknown_profile_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, "huge")
    with pytest.raises(ValueError, match="WORKBENCH_PROFILE='huge' is not a profile; use one of quick, paper"):
        get_profile()


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_every_sae_a_notebook_builds_from_a_profile_is_valid(name):
    """The sweeps a profile describes must give valid SAE configs: k below each expert's width,
    widths divisible by the expert counts."""
    P = get_profile(name)
    d = 384 if name == "quick" else 768
    for k in P.ks:
        make_config("topk", d_in=d, d_sae=P.width, k=k)
        for e in P.flop_matched_experts:
            make_config("switch", d_in=d, d_sae=P.width * e, k=k, n_experts=e)
    for e in P.width_matched_experts:
        make_config("switch", d_in=d, d_sae=P.width, k=min(P.ks), n_experts=e)
    cfg = P.run_config({"a": {"architecture": "topk", "d_sae": P.width, "k": P.k}}, "runs/x", total_steps=7)
    cfg.validate()
    assert cfg.train.total_steps == 7 and cfg.train.lr == P.lr
    cfg.data.model.n_tokens = 1  # a run's config is a copy: the profile is left alone
    assert P.data.model.n_tokens > 1


def _synthetic_run(run_dir, steps=20):
    return RunConfig.from_dict({
        "run_dir": str(run_dir),
        "train": {"total_steps": steps, "lr": 3e-3, "progress_bar": False, "log_every": 5},
        "data": {"source": "synthetic", "batch_size": 128, "eval_tokens": 512,
                 "synthetic": {"d": 16, "n_features": 32}},
        "saes": {"topk": {"architecture": "topk", "d_sae": 64, "k": 4},
                 "switch": {"architecture": "switch", "d_sae": 64, "k": 4, "n_experts": 4}},
    })


def test_run_writes_its_history_by_sae(tmp_path):
    run(_synthetic_run(tmp_path / "r"), progress=False)
    history = read_history(tmp_path / "r")
    assert sorted(history) == ["switch", "topk"]
    assert [row["step"] for row in history["topk"]] == [5, 10, 15, 20]
    assert [row["tokens"] for row in history["topk"]] == [640, 1280, 1920, 2560]
    assert len(history["switch"][-1]["expert_load"]) == 4
    assert history["topk"][-1]["mse"] < history["topk"][0]["mse"]


def test_read_history_of_an_unfinished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no history.json; it is written when a run finishes"):
        read_history(tmp_path)


def test_overwrite_replaces_an_earlier_run(tmp_path):
    run(_synthetic_run(tmp_path / "r"), progress=False)
    with pytest.raises(ValueError, match="already holds a run with checkpoints"):
        run(_synthetic_run(tmp_path / "r"), progress=False)
    run(_synthetic_run(tmp_path / "r", steps=10), progress=False, overwrite=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["total_steps"] == 10
    assert [row["step"] for row in read_history(tmp_path / "r")["topk"]][-1] == 10


def test_overwrite_refuses_a_folder_a_run_did_not_make(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds files a run does not write \(notes.txt\)"):
        run(_synthetic_run(tmp_path / "r"), progress=False, overwrite=True)
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"


def test_overwrite_and_resume_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="choose one"):
        run(_synthetic_run(tmp_path / "r"), progress=False, overwrite=True, resume=True)
