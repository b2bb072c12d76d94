"""The workbench's architectures inside SAELens (the ``saelens`` extra: ``pip install 'sae-workbench[saelens]'``).

Importing this module registers with SAELens' registry every architecture of ours that SAELens cannot
load natively (today only Switch; ReLU, TopK, Gated, JumpReLU, BatchTopK and Matryoshka folders are
written in SAELens' own architectures and need nothing), so that a folder written by
:func:`workbench.io.save` loads in SAELens::

    import sae_lens
    import workbench.saelens_plugin  # noqa: F401  (registers "switch")

    sae = sae_lens.SAE.load_from_disk("runs/switch/sae")  # a workbench.saelens_plugin.SwitchSAE
    feature_acts = sae.encode(x)        # (..., d_sae): exactly the workbench's sae(x).code.dense()
    recon = sae.decode(feature_acts)    # exactly the workbench's sae(x).recon_BD

The SAELens class (:class:`WorkbenchSAE`, one subclass per architecture, e.g. :class:`SwitchSAE`) owns
the parameters under the folder's names (``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``, ``W_router``,
``b_router``), as every SAELens SAE does, and computes with the workbench's own module, which it holds
and points at those very tensors (nothing is copied): ``encode`` is our ``encode_code`` (our ``forward``'s
code when gradients are on, for architectures whose training code is the inference code, such as
Switch, so that SAELens users get the encoder's gradient), ``decode`` our ``decode``. SAELens' input
handling around them is kept: dtype cast, ``hook_z`` reshaping, ``hook_sae_input``,
``hook_sae_acts_post``, ``hook_sae_recons`` and its per-token input normalisations; ``hook_sae_acts_pre``
never fires (a Switch SAE computes only its token's expert, not all pre-activations). Inputs may have
any leading dimensions. ``fold_activation_norm_scaling_factor`` folds the scale into every input-side
weight, the router's included; ``fold_W_dec_norm`` and ``fold_activation_whitening`` are refused (they
would change which latents the TopK inside an expert picks, or miss the router). Only inference classes
are registered; SAELens cannot train these architectures.

Registering is idempotent: importing or reloading this module again replaces only the classes it
registered itself, and never touches a name SAELens (or anyone else) already registered.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

try:
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class
    from sae_lens.saes.sae import SAE, SAEConfig
except ModuleNotFoundError as e:
    if e.name is None or e.name.split(".")[0] != "sae_lens":
        raise  # sae_lens is there but one of its own dependencies is not: its error says which
    raise ImportError("workbench.saelens_plugin needs sae-lens: pip install 'sae-workbench[saelens]'") from None

import torch
from torch import Tensor

from .saes.base import BaseSAE
from .saes.base import SAEConfig as WorkbenchConfig
from .saes.registry import ARCHITECTURES, make_config

DIFFERENTIABLE_ENCODE = frozenset({"switch"})
"""Architectures whose ``forward`` gives, with gradients, the same code as their ``encode_code``
(BatchTopK's does not: it picks across the batch)."""


def saelens_name(architecture: str) -> str:
    """The ``architecture`` a folder of our ``architecture`` carries in its cfg.json."""
    return ARCHITECTURES[architecture][0].saelens_architecture or architecture


@dataclasses.dataclass
class WorkbenchSAEConfig(SAEConfig):
    """SAELens' config of a workbench architecture: SAELens' fields plus our config's own (its
    subclasses add them), so that SAELens' ``to_dict``/``save_model`` writes what the workbench reads."""

    workbench_architecture: ClassVar[str] = ""

    @classmethod
    def architecture(cls) -> str:
        return saelens_name(cls.workbench_architecture)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.workbench_config()  # a ValueError naming the field, before any weight is built

    def workbench_config(self) -> WorkbenchConfig:
        """Our validated config of the same SAE."""
        names = [f.name for f in dataclasses.fields(ARCHITECTURES[self.workbench_architecture][0])]
        return make_config(self.workbench_architecture, **{name: getattr(self, name) for name in names})


class WorkbenchSAE(SAE[WorkbenchSAEConfig]):
    """A workbench SAE as a SAELens SAE: SAELens' interface and parameters, the workbench's computation."""

    differentiable_encode: ClassVar[bool] = False
    """True: with gradients enabled, ``encode`` takes our ``forward``'s code, which carries them."""

    def initialize_weights(self) -> None:
        """Our module, built (as our seeded initialisation) on SAELens' device and dtype; its parameters
        become this SAE's. On the "meta" device, as ``load_from_disk`` builds, nothing is allocated."""
        cfg = self.cfg.workbench_config()
        if not self.cfg.apply_b_dec_to_input and "apply_b_dec_to_input" not in cfg.__dataclass_fields__:
            raise ValueError(f"a workbench {cfg.architecture} SAE subtracts b_dec from its input; "
                             f"apply_b_dec_to_input=False is not supported")
        if self.device.type == "meta":
            with torch.device("meta"):
                module = ARCHITECTURES[cfg.architecture][1](cfg)
        else:
            module = ARCHITECTURES[cfg.architecture][1](cfg).to(self.device)
        module = module.to(self.dtype).eval()
        if list(module.buffers()) or any("." in name for name, _ in module.named_parameters()):
            raise NotImplementedError(f"a workbench {cfg.architecture} SAE holds buffers or submodules; "
                                      f"workbench.saelens_plugin shares flat parameters only")
        object.__setattr__(self, "_workbench_sae", module)  # not a submodule: outside state_dict and hooks
        for name, param in module.named_parameters():
            setattr(self, name, param)

    def workbench_sae(self) -> BaseSAE:
        """The workbench module computing with this SAE's current parameters (the same tensors; SAELens'
        ``load_state_dict(assign=True)`` and ``to`` may have replaced them since the last call)."""
        module: BaseSAE = self.__dict__["_workbench_sae"]
        for name in module._parameters:
            module._parameters[name] = self._parameters[name]
        return module

    def encode(self, x: Tensor) -> Tensor:
        sae_in = self.reshape_fn_in(x.to(self.dtype))
        sae_in = self.run_time_activation_norm_fn_in(self.hook_sae_input(sae_in))
        if sae_in.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this SAE reads activations of width d_in={self.cfg.d_in}, got shape "
                             f"{tuple(sae_in.shape)}")
        module = self.workbench_sae()
        x_BD = sae_in.reshape(-1, self.cfg.d_in)
        if self.differentiable_encode and torch.is_grad_enabled():
            code = module(x_BD).code
        else:
            code = module.encode_code(x_BD)
        feature_acts = code.dense().reshape(*sae_in.shape[:-1], self.cfg.d_sae)
        return self.hook_sae_acts_post(feature_acts)

    def decode(self, feature_acts: Tensor) -> Tensor:
        sae_out = self.hook_sae_recons(self.workbench_sae().decode(feature_acts))
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        expected = set(self._parameters)
        missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or extra:
            raise ValueError(f"the weights do not match a workbench {self.cfg.workbench_architecture} SAE: "
                             f"missing {missing}, unexpected {extra}")

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Read raw x where the SAE was trained on scaling_factor * x: our ``fold_input_scale_``,
        which also scales the weights SAELens' base class does not know (the router's)."""
        self.workbench_sae().fold_input_scale_(scaling_factor)
        self.cfg.normalize_activations = "none"

    def fold_W_dec_norm(self) -> None:
        raise NotImplementedError(f"folding decoder norms into a workbench {self.cfg.workbench_architecture} "
                                  f"SAE would change which latents its TopK picks")

    def fold_activation_whitening(self, mean: Tensor, whitening_matrix: Tensor,
                                  unwhitening_matrix: Tensor) -> None:
        raise NotImplementedError(f"folding a whitening into a workbench {self.cfg.workbench_architecture} "
                                  f"SAE is not supported")


def saelens_classes(architecture: str) -> tuple[type[WorkbenchSAEConfig], type[WorkbenchSAE]]:
    """SAELens' (config class, SAE class) of one of our architectures; e.g. for "switch",
    (``SwitchSAEConfig``, ``SwitchSAE``), the config holding SwitchConfig's fields and defaults."""
    ours_cfg, ours_sae = ARCHITECTURES[architecture]
    taken = {f.name for f in dataclasses.fields(SAEConfig)}
    fields = [(f.name, f.type, dataclasses.field(default=f.default, default_factory=f.default_factory))
              for f in dataclasses.fields(ours_cfg) if f.name not in taken]
    name = ours_sae.__name__
    cfg_cls = dataclasses.make_dataclass(
        f"{name}Config", fields, bases=(WorkbenchSAEConfig,), kw_only=True,
        namespace={"workbench_architecture": architecture, "__module__": __name__,
                   "__doc__": f"SAELens' config of the workbench's {architecture} SAE ({ours_cfg.__name__}'s fields)."})
    sae_cls = type(name, (WorkbenchSAE,), {
        "__module__": __name__, "__qualname__": name, "differentiable_encode": architecture in DIFFERENTIABLE_ENCODE,
        "__doc__": f"The workbench's {architecture} SAE ({ours_sae.__module__}.{name}) as a SAELens SAE."})
    return cfg_cls, sae_cls


def register() -> dict[str, type[WorkbenchSAE]]:
    """Register with SAELens each of our architectures whose SAELens name it lacks (or that an earlier
    import of this module registered); returns {SAELens name: SAE class} of those. SAELens' own
    architectures, and names anyone else registered, are left as they are."""
    registered = {}
    for architecture in ARCHITECTURES:
        name = saelens_name(architecture)
        present = SAE_CLASS_REGISTRY.get(name)
        if present is not None and getattr(present[0], "__module__", None) != __name__:
            continue  # SAELens reads this architecture itself
        if architecture not in _CLASSES:
            _CLASSES[architecture] = saelens_classes(architecture)
        cfg_cls, sae_cls = _CLASSES[architecture]
        if present is None:
            register_sae_class(name, sae_cls, cfg_cls)
        else:  # ours, from before a reload: point SAELens at this module's classes
            SAE_CLASS_REGISTRY[name] = (sae_cls, cfg_cls)
        registered[name] = sae_cls
    return registered


_CLASSES: dict[str, tuple[type[WorkbenchSAEConfig], type[WorkbenchSAE]]] = {"switch": saelens_classes("switch")}
SwitchSAEConfig, SwitchSAE = _CLASSES["switch"]
REGISTERED = register()
"""{SAELens architecture name: class} this import registered; {"switch": SwitchSAE} with SAELens 6."""
