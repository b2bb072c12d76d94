"""Architecture names -> (config class, module class). The one place that lists them."""
from __future__ import annotations

import dataclasses

from .base import WORKBENCH_ARCHITECTURE_KEY, BaseSAE, SAEConfig
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .relu import ReLUConfig, ReLUSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

ARCHITECTURES: dict[str, tuple[type[SAEConfig], type[BaseSAE]]] = {
    "relu": (ReLUConfig, ReLUSAE),
    "topk": (TopKConfig, TopKSAE),
    "gated": (GatedConfig, GatedSAE),
    "switch": (SwitchConfig, SwitchSAE),
    "batchtopk": (BatchTopKConfig, BatchTopKSAE),
    "jumprelu": (JumpReLUConfig, JumpReLUSAE),
    "matryoshka_batchtopk": (MatryoshkaConfig, MatryoshkaSAE),
}


def architecture_of(saved_cfg: dict) -> str | None:
    """Our architecture name for a saved cfg.json (ours, or SAELens' name for it); None if unknown.

    Where several of ours save under one SAELens name, the one whose own name it is wins, unless the
    folder says which of ours wrote it."""
    ours = saved_cfg.get(WORKBENCH_ARCHITECTURE_KEY)
    if ours in ARCHITECTURES:
        return ours
    name = saved_cfg.get("architecture")
    if name in ARCHITECTURES:
        return name
    return next((arch for arch, (cls, _) in ARCHITECTURES.items() if cls.saelens_architecture == name), None)


def config_class(architecture: str) -> type[SAEConfig]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture][0]


def make_config(architecture: str, **fields) -> SAEConfig:
    """Build and validate a config, e.g. ``make_config("topk", d_in=384, d_sae=3072, k=32)``.

    An unknown or missing field, a value of the wrong type and a NaN or Inf number raise a one-line
    ValueError naming the field."""
    cls = config_class(architecture)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{architecture} SAE has no field(s) {unknown}; its fields are {sorted(known)}")
    missing = [name for name, f in known.items() if name not in fields
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{architecture} SAE is missing required field(s) {missing}")
    cfg = cls(**fields)
    cfg.validate()
    return cfg


def build_sae(cfg: SAEConfig | dict) -> BaseSAE:
    """The module for a config (or a dict with an ``"architecture"`` key)."""
    if isinstance(cfg, dict):
        fields = dict(cfg)
        cfg = make_config(fields.pop("architecture", ""), **fields)
    return ARCHITECTURES[cfg.architecture][1](cfg)
