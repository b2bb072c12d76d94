"""The row-sparse training step (``TrainConfig.optimizer="sparse_adam"``): a step whose cost grows with
the latents that fired in the batch, not with the dictionary.

In a k-sparse SAE (TopK, BatchTopK, Matryoshka, Switch) a batch of B tokens gives encoder and decoder
gradient to at most B*K latents, the *touched* ones (AuxK's dead latents included). Dense Adam still
passes over all F*D weights of both matrices and their two moments at every step, and so do gradient
clipping and the decoder's unit-norm constraint. Here, for the weights the SAE declares row-sparse
(:meth:`~workbench.saes.base.BaseSAE.row_sparse_weights`):

* the backward gives their gradients as (touched latent ids, (T, D) rows), never a dense (F, D)
  tensor (:func:`~workbench.saes.base.collect_row_grads`);
* gradient clipping takes the global norm from those rows and the dense parameters' gradients
  (exact: untouched rows have zero gradient);
* the decoder's gradient projection and renormalisation run on the touched rows (exact: untouched
  rows are not moved, so they stay at unit norm);
* :class:`RowAdam` steps the touched rows only, with the semantics of ``torch.optim.SparseAdam``:
  the moments of a row that did not fire are neither decayed nor applied, and the bias correction
  counts every step. Each chunk of touched rows is gathered, stepped by torch's own fused Adam kernel
  (``torch.optim.adam.adam``, the same arithmetic as the dense ``torch.optim.Adam``, so the first
  step is identical), and scattered back;
* the other parameters (biases, router) keep the fused dense Adam.

Why not ``torch.optim.SparseAdam`` itself: it needs a sparse COO gradient on an (F, D) parameter,
but W_enc is saved and used as (D, F); it places eps outside the bias correction (its first step
differs from dense Adam's); and its ``sparse_mask`` gathers cost 2.3x the gather-step-scatter here
(``python benchmarks/bench_row_adam.py``: 100,000 touched rows of 384 in a 262,144-row weight).

What it costs: per touched row, a gather and a scatter of the row and its two moments around the
fused kernel, about 8x what dense fused Adam pays per row on a CPU (the same script); when every row
is touched the step runs in place instead. The row-sparse step therefore pays where the dense step's
passes over untouched rows dominate: dictionaries wide against the B*K latent slots of a batch, above
all Switch SAEs (``benchmarks/bench_saes.py --optimizer sparse_adam --moonshot``: 0.37x against dense
Adam's 0.16x). Its lazy semantics cost quality (``benchmarks/compare_optimizers.py``), so the
trainer's default is dense Adam.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as adam_step

from ..saes.base import (BaseSAE, RowWeight, collect_row_grads, merged_row_grads,
                         stop_collecting_row_grads)

ROWS_PER_CHUNK_BYTES = 4 * 2**20
"""On the CPU the touched rows are stepped in chunks of about this many bytes per tensor: small
enough to be reused from the heap (a fresh 100 MB gather costs more in page faults than the step) and
to stay in cache between gather, step and scatter."""


class RowGrads:
    """The row-sparse gradients of one SAE's weights for one step, collected during its backward.

        with RowGrads(sae) as grads:       # before the forward
            loss = sum(sae(x).losses.values()); loss.backward()
        grads.rows                          # {name: (ids_T, grad_TD)} after the with block
    """

    def __init__(self, sae: BaseSAE):
        self.weights = {w.name: w for w in sae.row_sparse_weights()}
        self._sinks: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.rows: dict[str, tuple[Tensor, Tensor]] = {}

    def __enter__(self) -> RowGrads:
        self._sinks = {name: collect_row_grads(w.param) for name, w in self.weights.items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, w in self.weights.items():
            stop_collecting_row_grads(w.param)
            if exc[0] is None and w.param.grad is not None:
                raise RuntimeError(f"{name} got a dense gradient although {type(w.param).__name__} {name} was "
                                   f"declared row-sparse by the SAE; this architecture cannot train with "
                                   f"optimizer='sparse_adam', use 'adam'")
        if exc[0] is None:
            self.rows = {name: merged_row_grads(self._sinks[name], w.rows_FD.shape[1], w.rows_FD)
                         for name, w in self.weights.items()}
        self._sinks = {}

    def sq_norm(self) -> Tensor:
        """Sum of the squared gradient entries of every row-sparse weight (0-dim tensor)."""
        norms = [torch.linalg.vector_norm(rows_TD) for _, rows_TD in self.rows.values()]
        return torch.stack(norms).square().sum() if norms else torch.zeros(())


class RowAdam:
    """Lazy Adam over the rows of an SAE's row-sparse weights (see the module docstring): per weight,
    two (F, D) moments; one step count shared by all rows (the bias correction of step t, as
    ``torch.optim.SparseAdam``). ``eps`` as in ``torch.optim.Adam`` (1e-8)."""

    def __init__(self, sae: BaseSAE, betas: tuple[float, float], eps: float = 1e-8):
        self.betas, self.eps = betas, eps
        weights = sae.row_sparse_weights()
        if not weights:
            raise ValueError(f"a {sae.cfg.architecture} SAE has no row-sparse weights (every latent gets gradient "
                             f"from every token), so optimizer='sparse_adam' cannot train it; use 'adam'")
        self.state = {w.name: {"exp_avg": torch.zeros_like(w.rows_FD, memory_format=torch.contiguous_format),
                               "exp_avg_sq": torch.zeros_like(w.rows_FD, memory_format=torch.contiguous_format)}
                      for w in weights}
        device = weights[0].rows_FD.device
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self._fused = device.type in ("cpu", "cuda")
        self._no_inf = torch.zeros((), device=device)  # fused Adam's found_inf, beside grad_scale

    @torch.no_grad()
    def step(self, grads: RowGrads, lr: float, clip_coef: Tensor | None = None) -> None:
        """One step of the touched rows in ``grads`` (ids sorted and unique) at ``lr``: each chunk of
        rows is gathered once and, in this order, its gradient scaled by ``clip_coef`` (the global
        clipping factor, from :func:`clip_coefficient`), projected off the row (unit-norm weights),
        stepped by Adam, put back at unit norm (unit-norm weights) and scattered back: the dense
        step's operations, in the dense step's order, on these rows only. When every row was touched
        (a batch whose B*K latent slots cover the dictionary) there is nothing to gather: the same
        operations run in place, chunk by chunk."""
        for name, (ids_T, grad_TD) in grads.rows.items():
            weight = grads.weights[name]
            W_FD = weight.rows_FD
            m_FD, v_FD = self.state[name]["exp_avg"], self.state[name]["exp_avg_sq"]
            n_rows = len(ids_T)
            chunk = (max(1, ROWS_PER_CHUNK_BYTES // (W_FD.shape[1] * W_FD.element_size()))
                     if W_FD.device.type == "cpu" else max(n_rows, 1))
            every_row = n_rows == W_FD.shape[0] and W_FD.is_contiguous()  # sorted unique ids: 0..F-1
            for start in range(0, n_rows, chunk):
                rows = slice(start, start + chunk)
                if every_row:
                    self._step_rows(weight.unit_norm, W_FD[rows], grad_TD[rows], m_FD[rows], v_FD[rows], lr, clip_coef)
                    continue
                ids_C = ids_T[rows]
                W_CD, m_CD, v_CD = (t.index_select(0, ids_C) for t in (W_FD, m_FD, v_FD))
                self._step_rows(weight.unit_norm, W_CD, grad_TD[rows], m_CD, v_CD, lr, clip_coef)
                W_FD.index_copy_(0, ids_C, W_CD)
                m_FD.index_copy_(0, ids_C, m_CD)
                v_FD.index_copy_(0, ids_C, v_CD)
        self.step_count += 1

    def _step_rows(self, unit_norm: bool, W_CD: Tensor, g_CD: Tensor, m_CD: Tensor, v_CD: Tensor, lr: float,
                   clip_coef: Tensor | None) -> None:
        """Project, clip, Adam and renormalise contiguous rows in place."""
        if unit_norm:  # linear in g, so projecting before the clipping scale is the same
            along_C11 = torch.bmm(g_CD.unsqueeze(1), W_CD.unsqueeze(2))
            g_CD.addcmul_(along_C11.view(-1, 1), W_CD, value=-1.0)
        # adam() counts the step itself: it gets this step's count less one, in a copy. The fused
        # kernel applies the clipping factor as it reads g (grad_scale divides by it).
        scale = {}
        if clip_coef is not None:
            if self._fused:
                scale = {"grad_scale": 1.0 / clip_coef, "found_inf": self._no_inf}
            else:
                g_CD.mul_(clip_coef)
        adam_step([W_CD], [g_CD], [m_CD], [v_CD], [], [self.step_count.clone()], fused=self._fused,
                  foreach=False if not self._fused else None, amsgrad=False, beta1=self.betas[0],
                  beta2=self.betas[1], lr=lr, weight_decay=0.0, eps=self.eps, maximize=False, **scale)
        if unit_norm:
            W_CD.div_(W_CD.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "state": self.state, "betas": list(self.betas), "eps": self.eps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["state"]) != set(self.state):
            raise ValueError(f"sparse Adam state is for weights {sorted(state['state'])}, this SAE trains "
                             f"{sorted(self.state)} row by row")
        for name, moments in state["state"].items():
            for key, tensor in moments.items():
                self.state[name][key].copy_(tensor)
        self.step_count.copy_(state["step"])


def clip_coefficient(total_sq: Tensor, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``'s factor from the squared global norm: max_norm / (norm +
    1e-6), at most 1."""
    return (max_norm / (total_sq.sqrt() + 1e-6)).clamp_max(1.0)


def dense_sq_norm(params: list[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.stack([g.pow(2).sum() for g in grads]).sum()


def row_param_ids(sae: BaseSAE) -> set[int]:
    """ids of the parameters that ``sae`` trains row by row (left out of its dense Adam)."""
    return {id(w.param) for w in sae.row_sparse_weights()}


__all__ = ["RowAdam", "RowGrads", "RowWeight", "clip_coefficient", "dense_sq_norm", "row_param_ids"]
