"""`update_ratio`: ‖Δw‖/‖w‖ across one optimizer step, through the optimizer's step hooks.

On a logged step the pre-hook copies the parameters that have gradients
into buffers allocated once (fresh parameter-sized tensors page-fault on
every use); their norms are the weight norms `Diagnostics.step()` took
moments before (taken again only if a weight changed in between); the
post-hook subtracts the new values in place and takes the norms of the
difference. Nothing is copied on steps that are not logged. The result is
written at the next `step()` or `close()`, under the logged step's number
(`late`).

Closure-driven steps (`opt.step(closure)`: LBFGS, Lightning) run the forward
and backward, and so `Diagnostics.step()`, inside the optimizer's step, after
the pre-hook. The pre-hook then wraps the closure: the snapshot is taken when
its first call returns, i.e. of the weights right before the update (LBFGS
calls it again at new weights: ‖Δw‖ spans the whole step).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from tb_diag_logger import cost, distributed, reductions
from tb_diag_logger.collectors import Collector, Part

UPDATE_RATIO = "update_ratio"


class UpdateRatio(Collector):
    """Owns the optimizer hooks and the snapshot buffers."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[tuple[str, torch.Tensor]],
        on_error: Callable[[str, BaseException], None],
        impl: Optional[str] = None,
    ) -> None:
        self._params = list(params)
        self._plan = reductions.Planner(impl)  # of the snapshot: one parameter layout, reused
        self.in_closure_step = False  # an `opt.step(closure)` is running and has called its closure
        self._on_error = on_error
        self.pending: Optional[int] = None  # the logged step whose optimizer step to measure
        self.result: Optional[tuple[int, list[str], torch.Tensor]] = None
        self.cost_s = 0.0  # seconds spent in the hooks since `Diagnostics` last read it
        self._snapshot: Optional[list[torch.Tensor]] = None  # one buffer per parameter, or one flat copy
        self._flat = False
        self._snapshot_params: list[tuple[str, torch.Tensor]] = []
        self._old_norms: Optional[torch.Tensor] = None
        # (step, `_weight_keys` of every parameter, their local norms) from `offer_weight_norms`.
        self._offered: Optional[tuple[int, list[tuple[int, int, int]], torch.Tensor]] = None
        self._handles: list[Any] = []
        self.watch(optimizer)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure the steps of `optimizer` too (one more optimizer over some of the same parameters).

        Only the parameters that the stepping optimizer holds are measured.
        """
        self._handles += [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def offer_weight_norms(
        self, step: int, weights: Sequence[torch.Tensor], norms: torch.Tensor, flat: Optional[torch.Tensor] = None
    ) -> None:
        """The norms of `weights` (the local pieces of all `params`, in order) taken at logged step `step`,
        and `flat`, their `reductions.flatten` copy if one was made.

        The pre-step hook of that step uses them instead of reading every
        parameter once more (the flat copy is then the snapshot), unless a
        parameter was modified in place or replaced in between (a version
        counter or the data pointer moved).
        """
        keys = _weight_keys([p for _, p in self._params], weights)
        self._offered = (step, keys, norms, flat) if len(keys) == len(self._params) == norms.numel() else None

    def _take_offer(self, idx: list[int], local: list[torch.Tensor]) -> Optional[tuple[torch.Tensor, Any]]:
        """(norms of parameters `idx`, whose local pieces are `local`; the flat copy of all of them or None)
        from the offer if it is still true, else None."""
        offered, self._offered = self._offered, None
        if offered is None or offered[0] != self.pending:
            return None
        _, keys, norms, flat = offered
        if [keys[i] for i in idx] != _weight_keys([self._params[i][1] for i in idx], local):
            return None
        if len(idx) < len(keys):  # parameters without gradients are not stepped
            norms = norms[torch.tensor(idx, device=norms.device)]
            flat = None
        return norms, flat

    def _before(self, optimizer, args, kwargs) -> Optional[tuple[tuple, dict]]:
        self.in_closure_step = False
        # `args` starts with the optimizer itself (torch passes the step's own *args).
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if callable(closure):  # the gradients (and the step() call) come from inside it: snapshot after it
            self.in_closure_step = True
            wrapped = self._after_closure(optimizer, closure)
            if "closure" in kwargs:
                return args, {**kwargs, "closure": wrapped}
            return (args[0], wrapped, *args[2:]), kwargs
        self._snapshot_now(optimizer)
        return None

    def _after_closure(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any]) -> Callable[[], Any]:
        first = True

        def closure_then_snapshot() -> Any:
            nonlocal first
            out = closure()
            if first:  # later calls (LBFGS) run at weights the step has already moved
                first = False
                self._snapshot_now(optimizer)
            return out

        return closure_then_snapshot

    def _snapshot_now(self, optimizer: torch.optim.Optimizer) -> None:
        if self.pending is None:
            return
        start = cost.clock()
        try:
            with torch.no_grad():
                self._take_snapshot(optimizer)
        except Exception as e:
            self.pending = None
            self._on_error("update_ratio", e)
        self.cost_s += cost.clock() - start

    def _take_snapshot(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        idx = [i for i, (_, p) in enumerate(self._params) if p.grad is not None and id(p) in held]
        params = [self._params[i] for i in idx]
        local = [reductions._local(p) for _, p in params]
        # The offer holds these weights' norms (and their flat copy, for many small parameters)
        # from step() moments ago, if nothing has changed them since.
        norms, flat = self._take_offer(idx, local) or (None, None)
        plan = self._plan(local)
        if flat is None and plan.impl == "flat":
            flat = reductions.flatten(local)  # many small parameters: one flat copy (fresh: it is small)
        if flat is not None:
            self._snapshot, self._snapshot_params, self._flat = [flat], params, True
            if norms is None:
                norms = reductions.segment_norms(flat, reductions.segments(local), len(local), flat.device)
        else:
            if self._flat or self._snapshot is None or [n for n, _ in params] != [n for n, _ in self._snapshot_params]:
                self._snapshot = [torch.empty_like(w) for w in local]
                self._snapshot_params = params
            self._flat = False
            torch._foreach_copy_(self._snapshot, local)
            if norms is None:
                norms = plan.norms(self._snapshot, self._device())[0]
        self._old_norms = norms.to(self._device())

    def _after(self, optimizer, args, kwargs) -> None:
        self.in_closure_step = False
        step, self.pending = self.pending, None
        if step is None or self._snapshot is None or self._old_norms is None:
            return None
        start = cost.clock()
        try:
            with torch.no_grad():
                self._measure(step)
        except Exception as e:
            self._on_error("update_ratio", e)
        self.cost_s += cost.clock() - start
        return None

    def _measure(self, step: int) -> None:
        current = [reductions._local(p) for _, p in self._snapshot_params]
        if self._flat:
            delta = reductions.segment_norms(
                self._snapshot[0] - reductions.flatten(current), reductions.segments(current), len(current),
                self._device(),
            )
        else:
            # old - new, in the buffers (their layout is the parameters')
            delta = self._plan(self._snapshot).subtract_norms_(self._snapshot, current, self._device())
        old, self._old_norms = self._old_norms, None
        if distributed.any_sharded(p for _, p in self._snapshot_params):
            w = distributed.shard_weights([p for _, p in self._snapshot_params], delta.device)
            delta, _, old = distributed.reduce_sharded_norms(delta, delta, old, w, w)
        # ‖w‖ = 0 (a zero-initialised bias): the ratio is undefined, recorded as NaN.
        ratio = torch.where(old > 0, delta / old.clamp_min(torch.finfo(old.dtype).tiny), float("nan"))
        self.result = (step, [n for n, _ in self._snapshot_params], ratio)

    def _device(self) -> torch.device:
        return self._snapshot[0].device if self._snapshot else torch.device("cpu")

    def take(self) -> Optional[tuple[int, list[str], torch.Tensor]]:
        """The measured (step, names, ratios) if there is one, once."""
        result, self.result = self.result, None
        return result

    def late(self) -> list[tuple[int, list[Part]]]:
        """The ratio of the last logged step's optimizer step, once it has run."""
        result = self.take()
        if result is None:
            return []
        step, names, ratio = result
        return [(step, [Part(UPDATE_RATIO, names, ratio)])]

    def close(self) -> None:
        """Remove the optimizer hooks and drop the snapshot buffers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._snapshot = None
        self._flat = False
        self._snapshot_params = []
        self._old_norms = None
        self._offered = None
        self.pending = None
        self.result = None


def _weight_keys(params: Sequence[torch.Tensor], local: Sequence[torch.Tensor]) -> list[tuple[int, int, int]]:
    """What moves when a parameter is modified in place or replaced (`local`: their local pieces)."""
    # An in-place op on a DTensor moves its own counter; one on its shard (`to_local()`), the shard's.
    with torch.no_grad():
        return [(p._version, reductions._local(p)._version, w.data_ptr()) for p, w in zip(params, local)]
