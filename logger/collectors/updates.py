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

import operator
from typing import Any, Callable, Optional, Sequence

import torch

from tb_diag_logger import cost, distributed, reductions
from tb_diag_logger.collectors import Collector, ParamList, Part

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
        self._params = ParamList(params)  # the parameters to measure
        self._held: tuple[tuple, set[int]] = ((), set())  # (the optimizer's groups' identity, ids it holds)
        self._all_held: tuple[tuple, bool] = ((), False)  # (that identity, whether it holds every parameter)
        self._measure_plan: Optional[reductions.Plan] = None
        self._plan = reductions.Planner(impl)  # of the snapshot: one parameter layout, reused
        self.in_closure_step = False  # an `opt.step(closure)` is running and has called its closure
        self._on_error = on_error
        self.pending: Optional[int] = None  # the logged step whose optimizer step to measure
        self.result: Optional[tuple[int, list[str], torch.Tensor]] = None
        self.cost_s = 0.0  # seconds spent in the hooks since `Diagnostics` last read it
        self._snapshot: Optional[list[torch.Tensor]] = None  # one buffer per parameter, or one flat copy
        self._flat = False
        self._snapshot_params: list[tuple[str, torch.Tensor]] = []
        self._current: list[torch.Tensor] = []  # their local pieces
        self._old_norms: Optional[torch.Tensor] = None
        # (step, `_weight_keys` of every parameter, their local norms) from `offer_weight_norms`.
        self._offered: Optional[tuple[int, list[tuple[int, int, int]], torch.Tensor]] = None
        self._handles: list[Any] = []
        self.watch(optimizer)

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._params, self._offered, self._all_held = ParamList(params), None, ((), False)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure the steps of `optimizer` too (one more optimizer over some of the same parameters).

        Only the parameters that the stepping optimizer holds are measured.
        """
        self._handles += [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def offer_weight_norms(
        self, step: int, weights: Sequence[torch.Tensor], norms: torch.Tensor, flat: Optional[torch.Tensor] = None,
        pointers: Optional[Sequence[int]] = None,
    ) -> None:
        """The norms of `weights` (the local pieces of all `params`, in order) taken at logged step `step`,
        and `flat`, their flat copy if one was made (a `reductions.Plan` buffer, valid until that plan's next
        call: the next logged step, after this step's update has been measured).

        The pre-step hook of that step uses them instead of reading every
        parameter once more (the flat copy is then the snapshot), unless a
        parameter was modified in place or replaced in between (a version
        counter or the data pointer moved). `pointers`: `reductions.fingerprint(weights)` if the caller has it.
        """
        keys = _weight_keys(self._params.tensors, weights, self._params.sharded, pointers)
        self._offered = (step, keys, norms, flat) if len(weights) == len(self._params) == norms.numel() else None

    def _take_offer(self, idx: Optional[list[int]], keys: tuple[list, ...]) -> Optional[tuple[torch.Tensor, Any]]:
        """(norms of parameters `idx` (None: all), whose `_weight_keys` are now `keys`; the flat copy of all
        of them or None) from the offer if it is still true, else None."""
        offered, self._offered = self._offered, None
        if offered is None or offered[0] != self.pending:
            return None
        _, then, norms, flat = offered
        if idx is None:
            return (norms, flat) if then == keys else None
        if _pick(then, idx) != keys:
            return None
        # parameters without gradients are not stepped
        return norms[torch.tensor(idx, device=norms.device)], None

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
        tensors = self._params.tensors
        held = self._held_by(optimizer)
        no_grad = reductions.absent(list(map(reductions.GRAD, tensors)))
        if self._all_held[0] != self._held[0]:
            self._all_held = (self._held[0], all(id(p) in held for p in tensors))
        if not no_grad and self._all_held[1]:
            idx = None  # every parameter
        else:
            skip = set(no_grad)
            idx = [i for i, p in enumerate(tensors) if i not in skip and id(p) in held]
        params = self._params.pairs if idx is None else [self._params.pairs[i] for i in idx]
        chosen = tensors if idx is None else [tensors[i] for i in idx]
        local = [reductions._local(p) for p in chosen] if self._params.sharded else chosen
        # The offer holds these weights' norms (and their flat copy, for many small parameters)
        # from step() moments ago, if nothing has changed them since.
        keys = _weight_keys(chosen, local, self._params.sharded)
        norms, flat = self._take_offer(idx, keys) or (None, None)
        plan = self._plan(local, key=tuple(keys[-1]))  # their storage pointers: `reductions.fingerprint`
        self._measure_plan = plan
        if flat is None and plan.impl == "flat":
            flat = plan.flatten(local, slot=1)  # many small parameters: one flat copy (`_measure` takes slot 0)
        if flat is not None:
            self._snapshot, self._snapshot_params, self._flat = [flat], params, True
            self._current = local
            if norms is None:
                norms = plan.segment_norms(flat, flat.device)
        else:
            if self._flat or self._snapshot is None or _layout(self._snapshot) != _layout(local):  # .half(), .to()
                self._snapshot = [torch.empty_like(w) for w in local]
            self._flat = False
            self._snapshot_params = params
            self._current = local
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
        # the local pieces of `_snapshot_params`, as they are after the update
        current = [reductions._local(p) for _, p in self._snapshot_params] if self._params.sharded else self._current
        if self._flat:
            # A flat snapshot comes from a "flat" plan of these parameters (this one's, or the weight norms' of the
            # same tensors and impl), and the update moved no storage: that plan holds.
            plan = self._measure_plan
            delta = plan.segment_norms(plan.flatten(current).sub_(self._snapshot[0]), self._device())
        else:
            # old - new, in the buffers (their layout is the parameters')
            delta = self._plan(self._snapshot).subtract_norms_(self._snapshot, current, self._device())
        old, self._old_norms = self._old_norms, None
        if self._params.sharded:
            w = distributed.shard_weights([p for _, p in self._snapshot_params], delta.device)
            delta, _, old = distributed.reduce_sharded_norms(delta, delta, old, w, w)
        # ‖w‖ = 0 (a zero-initialised bias): the ratio is undefined, recorded as NaN.
        ratio = torch.where(old > 0, delta / old.clamp_min(torch.finfo(old.dtype).tiny), float("nan"))
        every = self._snapshot_params is self._params.pairs
        names = self._params.names if every else [n for n, _ in self._snapshot_params]
        self.result = (step, names, ratio)

    def _held_by(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """ids of the parameters `optimizer` holds, built again only when its groups' lists change."""
        groups = optimizer.param_groups
        key = (id(optimizer), tuple((id(g["params"]), len(g["params"])) for g in groups))
        if key != self._held[0]:
            self._held = (key, _held(optimizer))
        return self._held[1]

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
        self._current = []
        self._old_norms = None
        self._offered = None
        self.pending = None
        self.result = None


_VERSION = operator.attrgetter("_version")


def _weight_keys(params: Sequence[torch.Tensor], local: Sequence[torch.Tensor], sharded: bool,
                 pointers: Optional[Sequence[int]] = None) -> tuple[list, ...]:
    """What moves when a parameter is modified in place or replaced (`local`: their local pieces, the
    parameters themselves unless `sharded`): version counters and storage addresses (`pointers` if the
    caller has them), one C-level call per tensor."""
    versions = list(map(_VERSION, params))
    pointers = list(map(torch.Tensor.data_ptr, local)) if pointers is None else list(pointers)
    if not sharded:
        return versions, pointers
    # An in-place op on a DTensor moves its own counter; one on its shard (`to_local()`), the shard's.
    return versions, list(map(_VERSION, local)), pointers


def _pick(keys: tuple[list, ...], idx: list[int]) -> tuple[list, ...]:
    """`_weight_keys` of the parameters at `idx` from those of all."""
    return tuple([k[i] for i in idx] for k in keys)


def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of the parameters `optimizer` holds."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _layout(tensors: Sequence[torch.Tensor]) -> list[tuple]:
    """What a snapshot buffer must match to be reused: each tensor's shape, dtype and device."""
    return [(t.shape, t.dtype, t.device) for t in tensors]
