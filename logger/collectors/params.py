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
from tb_diag_logger.collectors import Collector, Item, Part
from tb_diag_logger.collectors.optim_state import GRAD_MISSING

GRAD_NORM, GRAD_MAX_ABS, GRAD_NONFINITE, GRAD_NORM_TOTAL, WEIGHT_NORM = (
    "grad_norm", "grad_max_abs", "grad_nonfinite", "grad_norm_total", "weight_norm"
)


def name_hash(names: Sequence[str]) -> float:
    """A number that differs between two lists of names (for `distributed.agree`)."""
    return float(zlib.crc32("\n".join(names).encode("utf-8")))


class ParameterNorms(Collector):
    """Gradient and weight statistics per parameter tensor."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]], *, impl: Optional[str] = None,
                 amp: Any = None, updates: Any = None) -> None:
        """`amp`: the `AmpState` that unscales gradient norms; `updates`: the `UpdateRatio` that reuses
        this step's weight norms; `impl`: the reduction implementation (`reductions.Plan`), None to choose."""
        self.params = list(params)
        self.names = [n for n, _ in self.params]
        self._grad_plan = reductions.Planner(impl)
        self._weight_plan = reductions.Planner(impl)
        self._amp = amp
        self._updates = updates
        self._grads: list[torch.Tensor] = []  # this step's gradients, for `finish`
        self._grad_names: list[str] = []
        self._missing = np.zeros(0, "f4")

    def device(self) -> torch.device:
        """Where a logged step's values are gathered: the first parameter's device."""
        for _, p in self.params:
            return reductions._local(p).device
        return torch.device("cpu")

    def signature(self) -> Sequence[float]:
        grad_names = [n for n, p in self.params if p.grad is not None]
        return [len(grad_names), name_hash(grad_names), len(self.names), name_hash(self.names)]

    def parts(self, step: int) -> list[Part]:
        ctx, device = self.ctx, self.ctx.device
        # Gradients that are not this step's (step() before backward()): none recorded, grad_missing included.
        with_grad = [p for _, p in self.params if p.grad is not None] if ctx.grads_valid else []
        self._grad_names = [n for n, p in self.params if p.grad is not None] if ctx.grads_valid else []
        self._missing = np.array([p.grad is None for _, p in self.params], "f4")
        grads = self._grads = [reductions.dense_values(reductions._local(p.grad)) for p in with_grad]
        weights = [reductions._local(p) for _, p in self.params]
        g_norm, g_max = self._grad_plan(grads).norms_and_max_abs(grads, device)
        w_norm, flat_w = self._weight_plan(weights).norms(weights, device)  # flat_w: many small parameters
        if self._updates is not None:  # the pre-step hook reuses them: weights are the same until opt.step()
            self._updates.offer_weight_norms(step, weights, w_norm, flat_w)
        if ctx.sharded and ctx.reduce:
            g_norm, g_max, w_norm = distributed.reduce_sharded_norms(
                g_norm, g_max, w_norm, distributed.shard_weights(with_grad, device),
                distributed.shard_weights([p for _, p in self.params], device),
            )
        if self._amp is not None:
            g_norm, g_max = self._amp.unscale(g_norm, g_max)
        total = torch.linalg.vector_norm(g_norm).reshape(1) if grads else torch.zeros(0, device=device)
        keep = ctx.reduce or not ctx.sharded  # a shard's own norm is not the tensor's
        names = self._grad_names
        return [
            Part(GRAD_NORM, names, g_norm, write=keep),
            Part(GRAD_MAX_ABS, names, g_max, write=keep),
            Part(GRAD_NORM_TOTAL, [""] if grads else [], total, write=keep),
            Part(WEIGHT_NORM, self.names, w_norm, write=keep),
        ]

    def finish(self, step: int, host: dict[str, np.ndarray]) -> list[Item]:
        grads, self._grads = self._grads, []
        norms = host[GRAD_NORM]
        nonfinite = np.zeros(len(norms), dtype=np.float32)
        bad = [i for i in range(len(norms)) if not np.isfinite(norms[i])]
        if bad:
            counts = reductions.nonfinite_counts([grads[i] for i in bad])
            if self.ctx.sharded and self.ctx.reduce:
                counts = distributed.sum_counts(counts)  # every rank sees the same `bad`
            nonfinite[bad] = counts
        items: list[Item] = []
        if len(norms) and (self.ctx.reduce or not self.ctx.sharded):
            items.append((GRAD_NONFINITE, self._grad_names, (), nonfinite))
        if self.names and self.ctx.grads_valid:  # which parameters got no gradient (a detached branch)
            items.append((GRAD_MISSING, self.names, (), self._missing))
        return items

    def clear(self) -> None:
        self._grads = []  # nothing of a step outlives it (a failure between parts and finish included)
