"""Parameter gradients and weights: `grad_norm`, `grad_max_abs`, `grad_nonfinite`, `grad_norm_total`,
`weight_norm` and `grad_missing`, for the parameters the user's include/exclude keep.

Norms are reduced by a `reductions.Plan` made once per parameter layout. The
AMP collector unscales them; under FSDP2 shards' norms are combined over
ranks, never gathered. Non-finite elements are counted only in the tensors
whose norm came back non-finite (a finite L2 norm means every element is).
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import numpy as np
import torch

from tb_diag_logger import distributed, reductions
from tb_diag_logger.collectors import Collector, Item, ParamList, Part
from tb_diag_logger.collectors.optim_state import GRAD_MISSING

GRAD_NORM, GRAD_MAX_ABS, GRAD_NONFINITE, GRAD_NORM_TOTAL, WEIGHT_NORM = (
    "grad_norm", "grad_max_abs", "grad_nonfinite", "grad_norm_total", "weight_norm"
)


def name_hash(names: Sequence[str]) -> float:
    """A number that differs between two lists of names (for `distributed.agree`)."""
    return float(zlib.crc32("\n".join(names).encode("utf-8")))


class ParameterNorms(Collector):
    """Gradient and weight statistics per parameter tensor.

    What depends only on the parameter list (names, whether any is a DTensor) is built when the list is
    set; the reduction plans are kept while the weights' storages stay put (`reductions.fingerprint`),
    so a logged step walks the parameters only to read their `.grad` and storage pointers.
    """

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], *, impl: Optional[str] = None,
                 amp: Any = None, updates: Any = None) -> None:
        """`amp`: the `AmpState` that unscales gradient norms; `updates`: the `UpdateRatio` that reuses
        this step's weight norms; `impl`: the reduction implementation (`reductions.Plan`), None to choose."""
        self.params = ParamList(params)
        self._grad_plan = reductions.Planner(impl)
        self._weight_plan = reductions.Planner(impl)
        self._amp = amp
        self._updates = updates
        self._grads: list[torch.Tensor] = []  # this step's gradients, for `finish`
        self._grad_names: Sequence[str] = []
        self._missing = np.zeros(0, "f4")
        self._grad_key: Optional[tuple] = None  # (weights' fingerprint, gradient-less positions) of the grad plan
        self._sparse = False  # some gradient of that layout is sparse: its values' sizes change every step

    def device(self) -> torch.device:
        """Where a logged step's values are gathered: the first parameter's device."""
        for p in self.params.tensors:
            return reductions._local(p).device
        return torch.device("cpu")

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.params, self._grad_key = ParamList(params), None

    def set_optimizer(self, optimizer: Any, updates: Any) -> None:
        self._updates = updates  # the weight norms it offers go to the new update ratio

    def signature(self) -> Sequence[float]:
        grad_names = [n for n, p in self.params.pairs if p.grad is not None]
        return [len(grad_names), name_hash(grad_names), len(self.params), name_hash(self.params.names)]

    def parts(self, step: int) -> list[Part]:
        ctx, device = self.ctx, self.ctx.device
        tensors = self.params.tensors
        all_grads = list(map(reductions.GRAD, tensors))
        absent = reductions.absent(all_grads)
        self._missing = np.zeros(len(tensors), "f4")
        self._missing[absent] = 1.0
        weights = [reductions._local(p) for p in tensors] if self.params.sharded else tensors
        fingerprint = reductions.fingerprint(weights)
        # Gradients that are not this step's (step() before backward()): none recorded, grad_missing included.
        if not ctx.grads_valid:
            with_grad, names = [], []
        elif absent:
            missing = set(absent)
            with_grad = [g for g in all_grads if g is not None]
            names = [n for i, n in enumerate(self.params.names) if i not in missing]
        else:
            with_grad, names = all_grads, self.params.names
        self._grad_names = names
        grads = self._dense(with_grad, (fingerprint, tuple(absent)))
        self._grads = grads
        g_norm, g_max = self._grad_plan(grads, key=self._grad_key if not self._sparse else None
                                        ).norms_and_max_abs(grads, device)
        w_norm, flat_w = self._weight_plan(weights, key=fingerprint).norms(weights, device)  # flat_w: small ones
        if self._updates is not None:  # the pre-step hook reuses them: weights are the same until opt.step()
            self._updates.offer_weight_norms(step, weights, w_norm, flat_w, pointers=fingerprint)
        if ctx.sharded and ctx.reduce:
            g_norm, g_max, w_norm = distributed.reduce_sharded_norms(
                g_norm, g_max, w_norm, distributed.shard_weights(with_grad, device),
                distributed.shard_weights(tensors, device),
            )
        if self._amp is not None:
            g_norm, g_max = self._amp.unscale(g_norm, g_max)
        total = torch.linalg.vector_norm(g_norm).reshape(1) if grads else torch.zeros(0, device=device)
        keep = ctx.reduce or not ctx.sharded  # a shard's own norm is not the tensor's
        return [
            Part(GRAD_NORM, names, g_norm, write=keep),
            Part(GRAD_MAX_ABS, names, g_max, write=keep),
            Part(GRAD_NORM_TOTAL, [""] if grads else [], total, write=keep),
            Part(WEIGHT_NORM, self.params.names, w_norm, write=keep),
        ]

    def _dense(self, grads: list[torch.Tensor], key: tuple) -> list[torch.Tensor]:
        """The gradients' local, dense values. Autograd gives a gradient its parameter's dtype, device and
        shape, so while the weights' fingerprint holds only a sparse gradient's values need looking at."""
        if key != self._grad_key:
            self._grad_key = key
            self._sparse = any(g.layout != torch.strided for g in grads)
        if self.params.sharded or self._sparse:
            return [reductions.dense_values(reductions._local(g)) for g in grads]
        return grads

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        grads, self._grads = self._grads, []
        norms = host[GRAD_NORM]
        nonfinite = np.zeros(len(norms), dtype=np.float32)
        bad = np.flatnonzero(~np.isfinite(norms)).tolist()
        if bad:
            counts = reductions.nonfinite_counts([grads[i] for i in bad])
            if self.ctx.sharded and self.ctx.reduce:
                counts = distributed.sum_counts(counts)  # every rank sees the same `bad`
            nonfinite[bad] = counts
        items: list[Item] = []
        if len(norms) and (self.ctx.reduce or not self.ctx.sharded):
            items.append((GRAD_NONFINITE, self._grad_names, (), nonfinite))
        if self.params.names and self.ctx.grads_valid:  # which parameters got no gradient (a detached branch)
            items.append((GRAD_MISSING, self.params.names, (), self._missing))
        return items

    def clear(self) -> None:
        self._grads = []  # nothing of a step outlives it (a failure between parts and finish included)
