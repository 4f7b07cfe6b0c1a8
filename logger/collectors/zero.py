"""DeepSpeed ZeRO: gradients and weights from the engine's partitions, never gathered.

Under ZeRO the model's tensors say little: after ``engine.backward()`` the
gradients live in the engine's partitioned buffers (``p.grad`` is None), at
stage 3 ``p`` itself is an empty placeholder, and the optimizer steps fp32
master copies of each rank's partition. So on a logged step each rank takes
the norms of its own fragments, read through the tensors DeepSpeed links to
every parameter (stage 1/2: ``p._hp_mapping``, stage 3: ``p._z3_optimizer``'s
local-partition accessors), and the ranks add them up:

- gradients: the averaged, partitioned gradients the optimizer is about to
  use (before the engine's clipping), so ``grad_norm_total`` is the norm
  that ``engine.get_global_grad_norm()`` reports after ``engine.step()``;
- weights and the update ratio: the fp32 master weights, the ones the
  optimizer updates;
- collectives per logged step: one SUM and one MAX all-reduce of a few
  floats per tensor here, one SUM of two floats per tensor for the update
  ratio at the next `step()` (see `ZeroUpdates`).

Parameters the engine does not manage (frozen, so left out of the ZeRO
groups at stage 1/2) are plain tensors, counted once (rank 0's copy).
A parameter the engine manages always has a gradient buffer: one that the
loss never reaches reads as an exactly zero gradient, not as a missing one.

Wiring (one place, `collectors/build.py`): with a DeepSpeed engine, or
parameters that `any_zero` recognises, `ZeroGradients` stands in for the
parameter-norm collector and `ZeroUpdates` for the update ratio's; both
hold collectives, so `parts`, `take`/`late` run on every rank (never from
an exit handler on one rank only).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from tb_diag_logger import distributed
from tb_diag_logger.collectors import Collector, Part

_ZERO_OPTIMIZERS = ("DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3")


def is_engine(obj: Any) -> bool:
    """A DeepSpeed engine (``deepspeed.initialize``'s first result), recognised without importing deepspeed."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(obj).__mro__) and isinstance(
        getattr(obj, "module", None), torch.nn.Module
    )


def zero_optimizer(obj: Any) -> Optional[Any]:
    """The ZeRO optimizer `obj` is or wraps (an engine, the ZeRO optimizer itself, a wrapper of it), or None."""
    for _ in range(8):
        if obj is None:
            return None
        if any(c.__name__ in _ZERO_OPTIMIZERS for c in type(obj).__mro__):
            return obj
        obj = getattr(obj, "optimizer", None)
    return None


def is_zero_param(p: torch.Tensor) -> bool:
    """Whether a ZeRO optimizer manages `p` (stage 3 partitions every parameter; stage 1/2 the trainable)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def any_zero(params: Sequence[tuple[str, torch.Tensor]]) -> bool:
    return any(is_zero_param(p) for _, p in params)


def full_shape(p: torch.Tensor) -> list[int]:
    """The parameter's own shape (a ZeRO-3 parameter's data is an empty placeholder between forwards)."""
    return list(getattr(p, "ds_shape", p.shape))


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _stage3_valid(p: torch.Tensor, piece: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 partition without the padding the last ranks carry."""
    part = int(p.ds_tensor.ds_numel)
    rank = distributed.rank()
    valid = max(0, min(part, full_numel(p) - rank * part))
    return piece.reshape(-1)[: min(valid, piece.numel())]


def local_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """This rank's fragment of `p`'s reduced gradient (possibly empty), or None when `p` has none."""
    if hasattr(p, "ds_id"):
        if not p.requires_grad:
            return None
        return _stage3_valid(p, p._z3_optimizer.get_local_fp32_grad_for_param(p))
    if hasattr(p, "_hp_mapping"):
        mapping = p._hp_mapping
        if mapping is None:  # no fragment of it in this rank's partition
            return p.new_zeros(0, dtype=torch.float32)
        frag = mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
        address = mapping.lp_fragment_address
        if frag.numel() == full_numel(p) and address.numel < frag.numel():  # a full buffer (bf16): our slice
            frag = frag.narrow(0, address.start, address.numel)
        return frag
    return p.grad


def local_master(p: torch.Tensor) -> torch.Tensor:
    """This rank's fragment of `p`'s fp32 master weights (possibly empty); a plain tensor whole."""
    if hasattr(p, "ds_id"):
        if not p.requires_grad:  # frozen at stage 3: still partitioned, no fp32 copy
            return _stage3_valid(p, p.ds_tensor)
        return _stage3_valid(p, p._z3_optimizer.get_local_fp32_param(p))
    if hasattr(p, "_hp_mapping"):
        mapping = p._hp_mapping
        return p.new_zeros(0, dtype=torch.float32) if mapping is None else mapping.get_hp_fragment().reshape(-1)
    return p.detach()


def _counted(p: torch.Tensor) -> float:
    """1.0 where this rank's piece of `p` goes into a SUM over ranks: fragments everywhere, a whole tensor on
    rank 0 only (every rank holds the same one)."""
    return 1.0 if is_zero_param(p) or distributed.rank() == 0 else 0.0


def _sq_and_max(pieces: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per piece: the sum of squares and the largest |value| (0 for an empty piece), float32."""
    if not pieces:
        z = torch.zeros(0, device=device)
        return z, z
    sq = torch.stack([p.float().pow(2).sum() if p.numel() else p.new_zeros((), dtype=torch.float32) for p in pieces])
    mx = torch.stack([p.float().abs().max() if p.numel() else p.new_zeros((), dtype=torch.float32) for p in pieces])
    return sq.to(device), mx.to(device)


class ZeroGradients(Collector):
    """grad_norm, grad_max_abs, grad_nonfinite, grad_norm_total, weight_norm and grad_missing from the
    engine's partitions (module docstring); every rank calls `parts` on every logged step."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]],
                 device: Optional[Callable[[], torch.device]] = None) -> None:
        self.params = list(params)
        self._device = device  # None: the orchestrator's step context says

    def device(self) -> torch.device:
        """Where this step's values go: the parameters' device (ZeRO-3's placeholders live there too)."""
        if self._device is not None:
            return self._device()
        return self.params[0][1].device if self.params else torch.device("cpu")

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self.params = list(params)

    def parts(self, step: int) -> list[Part]:
        device = self.device()
        grads = [(n, p, local_grad(p)) for n, p in self.params]
        with_grad = [(n, p, g) for n, p, g in grads if g is not None]
        g_sq, g_max = _sq_and_max([g for _, _, g in with_grad], device)
        w_sq, _ = _sq_and_max([local_master(p) for _, p in self.params], device)
        bad = [(~torch.isfinite(g)).sum().float() for _, _, g in with_grad]
        bad = torch.stack(bad).to(device) if bad else g_sq
        g_keep = torch.tensor([_counted(p) for _, p, _ in with_grad], device=device)
        w_keep = torch.tensor([_counted(p) for _, p in self.params], device=device)
        packed = torch.cat([g_sq * g_keep, w_sq * w_keep, bad * g_keep])
        if distributed.active():  # always: every rank holds the same parameter list, whatever else differs
            d = torch.distributed
            d.all_reduce(packed, op=d.ReduceOp.SUM)
            if g_max.numel():
                d.all_reduce(g_max, op=d.ReduceOp.MAX)
        G = len(with_grad)
        g_sq, w_sq, bad = packed[:G], packed[G : G + len(self.params)], packed[G + len(self.params) :]
        g_names = [n for n, _, _ in with_grad]
        g_norm = g_sq.sqrt()
        g_max = torch.where(torch.isnan(g_norm), g_norm, g_max)  # gloo's MAX drops NaN
        parts = [Part("weight_norm", [n for n, _ in self.params], w_sq.sqrt())]
        if G:
            parts += [
                Part("grad_norm", g_names, g_norm),
                Part("grad_max_abs", g_names, g_max),
                Part("grad_nonfinite", g_names, bad),
                Part("grad_norm_total", [""], g_sq.sum().sqrt().reshape(1)),
            ]
        missing = [0.0 if g is not None else 1.0 for _, _, g in grads]
        parts.append(Part("grad_missing", [n for n, _ in self.params], torch.tensor(missing, device=device)))
        return parts


class ZeroUpdates(Collector):
    """`update_ratio` of the fp32 master weights across one engine step (the interface of
    `updates.UpdateRatio`). The engine steps its inner optimizer once per parameter group, so the
    first pre-step hook of a logged step copies this rank's fragments, and `take()` (at the next
    `Diagnostics.step()`, on every rank) takes ‖Δw‖² and ‖w‖² of each and sums them over ranks (one
    all-reduce): by then every group has stepped."""

    in_closure_step = False

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor]],
                 on_error: Callable[[str, BaseException], None]) -> None:
        self.pending: Optional[int] = None
        self.cost_s = 0.0
        self._on_error = on_error
        self.follow(params)
        self._snapshot: Optional[tuple[int, list[str], list[torch.Tensor]]] = None
        self._stepped = False
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    def follow(self, params: Sequence[tuple[str, torch.Tensor]]) -> None:
        self._params = [(n, p) for n, p in params if is_zero_param(p) and p.requires_grad]

    def offer_weight_norms(self, *args: Any) -> None:
        """Nothing to reuse: the norms here are of the master fragments."""

    def _before(self, optimizer, args, kwargs) -> None:
        step, self.pending = self.pending, None
        if step is None or self._snapshot is not None:
            return
        try:
            with torch.no_grad():
                copies = [local_master(p).detach().float().clone() for _, p in self._params]
            self._snapshot, self._stepped = (step, [n for n, _ in self._params], copies), False
        except Exception as e:
            self._on_error("update_ratio", e)

    def _after(self, optimizer, args, kwargs) -> None:
        self._stepped = self._snapshot is not None

    def take(self) -> Optional[tuple[int, list[str], torch.Tensor]]:
        """The measured (step, names, ratios) once the engine has stepped; a collective (every rank)."""
        if self._snapshot is None or not self._stepped:
            return None
        (step, names, snapshot), self._snapshot = self._snapshot, None
        with torch.no_grad():
            now = [local_master(p).float() for _, p in self._params]
            delta, _ = _sq_and_max([old - new for old, new in zip(snapshot, now)], torch.device("cpu"))
            old, _ = _sq_and_max(snapshot, torch.device("cpu"))
            both = torch.cat([delta, old])
            if distributed.active():
                torch.distributed.all_reduce(both)
            delta, old = both.split(len(snapshot))
            ratio = torch.where(old > 0, delta.sqrt() / old.sqrt().clamp_min(1e-38), float("nan"))
        return step, names, ratio

    def late(self) -> list[tuple[int, list[Part]]]:
        """The collectors' form of `take()`: the last logged step's update ratio, once the engine stepped."""
        result = self.take()
        return [] if result is None else [(result[0], [Part("update_ratio", result[1], result[2])])]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._snapshot = None
        self.pending = None


__all__ = ["ZeroGradients", "ZeroUpdates", "any_zero", "full_numel", "full_shape", "is_engine", "zero_optimizer"]
