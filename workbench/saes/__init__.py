"""Sparse autoencoder architectures, one per file."""
from .base import BaseSAE, Code, SAEConfig, SAEOutput, UnitNormDecoder
from .gated import GatedConfig, GatedSAE
from .registry import ARCHITECTURES, build_sae, make_config
from .relu import ReLUConfig, ReLUSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

__all__ = ["ARCHITECTURES", "BaseSAE", "Code", "GatedConfig", "GatedSAE", "ReLUConfig", "ReLUSAE",
           "SAEConfig", "SAEOutput", "SwitchConfig", "SwitchSAE", "TopKConfig", "TopKSAE",
           "UnitNormDecoder", "build_sae", "make_config"]
