"""Sparse autoencoder architectures, one per file."""
from .base import BaseSAE, Code, LatentGroups, SAEConfig, SAEOutput, UnitNormDecoder
from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .registry import ARCHITECTURES, build_sae, make_config
from .relu import ReLUConfig, ReLUSAE
from .switch import SwitchConfig, SwitchSAE
from .topk import TopKConfig, TopKSAE

__all__ = ["ARCHITECTURES", "BaseSAE", "BatchTopKConfig", "BatchTopKSAE", "Code", "GatedConfig", "GatedSAE",
           "JumpReLUConfig", "JumpReLUSAE", "LatentGroups", "MatryoshkaConfig", "MatryoshkaSAE", "ReLUConfig",
           "ReLUSAE", "SAEConfig", "SAEOutput", "SwitchConfig", "SwitchSAE", "TopKConfig", "TopKSAE",
           "UnitNormDecoder", "build_sae", "make_config"]
