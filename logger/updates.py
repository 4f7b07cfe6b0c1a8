"""`update_ratio`: ‖Δw‖/‖w‖ across one optimizer step, through the optimizer's step hooks.

On a logged step the pre-hook copies the parameters that have gradients
into buffers allocated once (fresh parameter-sized tensors page-fault:
PERF_NOTES.md) and takes their norms; the post-hook subtracts the new
values in place and takes the norms of the difference. Nothing is copied on
steps that are not logged. The result is written at the next `step()` or
`close()`, under the logged step's number.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from tb_diag_logger import distributed, reductions


class UpdateRatio:
    """Owns the optimizer hooks and the snapshot buffers."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[tuple[str, torch.Tensor]],
        on_error: Callable[[str, BaseException], None],
    ) -> None:
        self._params = list(params)
        self._on_error = on_error
        self.pending: Optional[int] = None  # the logged step whose optimizer step to measure
        self.result: Optional[tuple[int, list[str], torch.Tensor]] = None
        self._snapshot: Optional[list[torch.Tensor]] = None
        self._snapshot_params: list[tuple[str, torch.Tensor]] = []
        self._old_norms: Optional[torch.Tensor] = None
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def _before(self, optimizer, args, kwargs) -> None:
        if self.pending is None:
            return None
        try:
            params = [(n, p) for n, p in self._params if p.grad is not None]
            if self._snapshot is None or [n for n, _ in params] != [n for n, _ in self._snapshot_params]:
                self._snapshot = [torch.empty_like(reductions._local(p.detach())) for _, p in params]
                self._snapshot_params = params
            torch._foreach_copy_(self._snapshot, [reductions._local(p.detach()) for _, p in params])
            self._old_norms = reductions.grouped_norms(self._snapshot, self._device())
        except Exception as e:
            self.pending = None
            self._on_error("update_ratio", e)
        return None

    def _after(self, optimizer, args, kwargs) -> None:
        step, self.pending = self.pending, None
        if step is None or self._snapshot is None or self._old_norms is None:
            return None
        try:
            current = [reductions._local(p.detach()) for _, p in self._snapshot_params]
            torch._foreach_sub_(self._snapshot, current)  # old - new, in the buffers
            delta = reductions.grouped_norms(self._snapshot, self._device())
            old, self._old_norms = self._old_norms, None
            if distributed.any_sharded(p for _, p in self._snapshot_params):
                w = distributed.shard_weights([p for _, p in self._snapshot_params], delta.device)
                delta, _, old = distributed.reduce_sharded_norms(delta, delta, old, w, w)
            # ‖w‖ = 0 (a zero-initialised bias): the ratio is undefined, recorded as NaN.
            ratio = torch.where(old > 0, delta / old.clamp_min(torch.finfo(old.dtype).tiny), float("nan"))
            self.result = (step, [n for n, _ in self._snapshot_params], ratio)
        except Exception as e:
            self._on_error("update_ratio", e)
        return None

    def _device(self) -> torch.device:
        return self._snapshot[0].device if self._snapshot else torch.device("cpu")

    def take(self) -> Optional[tuple[int, list[str], torch.Tensor]]:
        """The measured (step, names, ratios) if there is one, once."""
        result, self.result = self.result, None
        return result

    def close(self) -> None:
        """Remove the optimizer hooks and drop the snapshot buffers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._snapshot = None
        self._snapshot_params = []
        self._old_norms = None
        self.pending = None
        self.result = None
