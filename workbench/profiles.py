"""The two sizes the notebooks run at, chosen by one setting: ``WORKBENCH_PROFILE``.

- ``quick`` (default): CPU and offline. MiniLM-L6's residual stream after block 2 on CPython's prose,
  widths of about a thousand, a few hundred steps. The whole notebook series runs in CI in minutes.
- ``paper``: a GPU and the hub. GPT-2 small's residual stream after block 8 on OpenWebText (streamed),
  the papers' widths, k and alpha, and tens of thousands of steps.

A notebook reads ``P = get_profile()`` once and takes every size from ``P``, so the same cells run at
either scale::

    P = get_profile()
    saes = {f"topk_k{k}": {"architecture": "topk", "d_sae": P.width, "k": k} for k in P.ks}
    results = run(P.run_config(saes, "runs/k-sweep"))
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from .runconfig import DataConfig, ModelDataConfig, RunConfig
from .train.trainer import TrainConfig

PROFILE_ENV = "WORKBENCH_PROFILE"


@dataclass(frozen=True)
class Profile:
    """Every size a notebook needs, at one scale."""

    name: str
    """"quick" or "paper"."""
    data: DataConfig
    """Which activations, how many tokens, batch size; harvested once into the activation cache and
    shared by every notebook that uses the same profile."""
    steps: int
    """Training steps of one run."""
    lr: float | None
    """One learning rate for every SAE of a run (so that comparisons are like for like), or None for
    each architecture's own rule (TopK/Switch 2e-4/sqrt(M/2^14), Gated 3e-4, ReLU 5e-5)."""
    width: int
    """The dense baseline's number of latents M (the papers' 24,576 for GPT-2 small)."""
    k: int
    """Active latents per token of TopK and Switch when a notebook uses one k."""
    ks: tuple[int, ...]
    """The k sweep of a frontier."""
    l1_coefficients: tuple[float, ...]
    """The L1 sweep of ReLU and Gated SAEs (on activations normalised to E|x|^2 = d)."""
    flop_matched_experts: tuple[int, ...]
    """Switch experts at equal encoder FLOPs per token: each expert as wide as the dense baseline."""
    width_matched_experts: tuple[int, ...]
    """Switch experts at equal total width: the dense baseline's latents split between experts."""
    alphas: tuple[float, ...]
    """The load-balancing coefficients of the alpha sweep."""
    seeds: tuple[int, ...]
    """SAE seeds of the seed-stability comparison."""
    widths: tuple[int, ...]
    """The width sweep (seed stability, scaling)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Sizes one notebook needs and no other, by name."""

    def train_config(self, **overrides: Any) -> TrainConfig:
        """This profile's training settings (steps, lr, logging every 1/20 of the run), with overrides."""
        fields = {"total_steps": self.steps, "lr": self.lr, "log_every": max(1, self.steps // 20),
                  "warmup_steps": min(100, self.steps // 10)}
        return TrainConfig(**{**fields, **overrides})

    def run_config(self, saes: dict[str, dict[str, Any]], run_dir: str, **train_overrides: Any) -> RunConfig:
        """A run of ``saes`` side by side on this profile's activations, written to ``run_dir``."""
        return RunConfig(saes=saes, train=self.train_config(**train_overrides),
                         data=copy.deepcopy(self.data), run_dir=run_dir)


QUICK = Profile(
    name="quick",
    data=DataConfig(batch_size=512, eval_tokens=16_384,
                    model=ModelDataConfig(n_tokens=100_000, downstream_contexts=32)),
    steps=300,
    lr=1e-3,
    width=1024,
    k=16,
    ks=(8, 16, 32),
    l1_coefficients=(0.01, 0.02, 0.04),
    flop_matched_experts=(2, 4, 8),
    width_matched_experts=(16, 32, 64),
    alphas=(0.0, 0.1, 1.0, 3.0, 10.0),
    seeds=(0, 1),
    widths=(256, 512, 1024),
    extra={"05_width": 512, "05_downstream_contexts": 4,
           # 300 steps move a JumpReLU's log-threshold by at most ~lr * steps = 0.3: at this scale the
           # initial threshold sets the L0, so the sweep is over it (at lambda 0.01).
           "10_width": 512, "10_ks": (8, 16, 32),
           "10_jumprelu": ({"init_threshold": 0.8}, {"init_threshold": 1.6}),
           "10_gated_l1": (0.01,)},
)

PAPER = Profile(
    name="paper",
    data=DataConfig(batch_size=8192, eval_tokens=262_144,
                    model=ModelDataConfig(name="gpt2", site="resid_post.8", text="Skylion007/openwebtext",
                                          eval_split="train", n_tokens=50_000_000,
                                          downstream_contexts=128)),
    steps=100_000,
    lr=None,
    width=24_576,
    k=64,
    ks=(8, 16, 32, 64, 128, 192),
    l1_coefficients=(0.003, 0.006, 0.01, 0.02, 0.04),
    flop_matched_experts=(2, 4, 8),
    width_matched_experts=(16, 32, 64, 128),
    alphas=(0.0, 0.001, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0),
    seeds=(0, 1),
    widths=(4096, 16_384, 32_768),
    extra={"05_width": 24_576, "05_downstream_contexts": 128,
           "10_width": 24_576, "10_ks": (16, 32, 64, 128), "10_jumprelu": tuple({"l0_coefficient": lam} for lam in (0.001, 0.003, 0.01)),
           "10_gated_l1": (0.006, 0.02, 0.04)},
)

PROFILES = {p.name: p for p in (QUICK, PAPER)}


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``, or else the one ``$WORKBENCH_PROFILE`` names (default quick)."""
    name = name or os.environ.get(PROFILE_ENV) or "quick"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r} is not a profile; use one of {', '.join(PROFILES)}")
    return PROFILES[name]
