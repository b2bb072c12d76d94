"""Architecture names -> (config class, module class). The one place that lists them."""
from __future__ import annotations

from .base import BaseSAE, SAEConfig
from .gated import GatedConfig, GatedSAE
from .relu import ReLUConfig, ReLUSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

ARCHITECTURES: dict[str, tuple[type[SAEConfig], type[BaseSAE]]] = {
    "relu": (ReLUConfig, ReLUSAE),
    "topk": (TopKConfig, TopKSAE),
    "gated": (GatedConfig, GatedSAE),
    "switch": (SwitchConfig, SwitchSAE),
}


def config_class(architecture: str) -> type[SAEConfig]:
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture][0]


def make_config(architecture: str, **fields) -> SAEConfig:
    """Build and validate a config, e.g. ``make_config("topk", d_in=384, d_sae=3072, k=32)``."""
    cls = config_class(architecture)
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{architecture} SAE has no field(s) {unknown}; its fields are {sorted(known)}")
    cfg = cls(**fields)
    cfg.validate()
    return cfg


def build_sae(cfg: SAEConfig | dict) -> BaseSAE:
    """The module for a config (or a dict with an ``"architecture"`` key)."""
    if isinstance(cfg, dict):
        fields = dict(cfg)
        cfg = make_config(fields.pop("architecture", ""), **fields)
    return ARCHITECTURES[cfg.architecture][1](cfg)
